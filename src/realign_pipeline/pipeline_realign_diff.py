# Copyright 2026 The realign-pipeline authors. Licensed under the Apache License, Version 2.0.
"""RealignDiff for diffusers: a Stable Diffusion pipeline with mask-guided attention re-weighting.

RealignDiff (Xu et al., arXiv 2305.19599) aligns Stable Diffusion 1.x with its prompt in two
stages: a UNet fine-tuned with caption rewards (the coarse stage), then a second denoising pass
whose cross- and self-attention maps are re-weighted inside per-object masks (the fine stage,
the "re-weighting attention modulation" it takes from DenseDiffusion, Kim et al. 2023).

This single file stands alone on diffusers, transformers and torch so that it also works as a
Hub ``pipeline.py`` through ``custom_pipeline=``. Read it top to bottom:

1. prompt words and tokens: where a caption's words sit in the prompt's CLIP tokens;
2. ``PromptPhraseCaptioner``: the dense captioner that needs no model;
3. masks: user masks to tensors, overlaps to a partition, attention maps to masks;
4. attention: the re-weighting as a pure function, the recorder, the per-call state, and
   ``RealignAttnProcessor``;
5. ``RealignDiffPipeline``: coarse pass, layout, fine pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

logger = logging.get_logger(__name__)

MaskLike = PIL.Image.Image | np.ndarray | torch.Tensor

# Words that carry no object or attribute: a caption's region never claims their tokens.
NON_CONTENT_WORDS = frozenset(
    "a an the this that these those some any each every one two three four five his her its their our your my "
    "and or but with without of on in at to into onto from by for as near next beside behind above below under "
    "over top bottom left right side front back between while is are was were be been being has have had "
    ", . ; : ! ? ' \" ( )".split()
)


# ---------------------------------------------------------------------------------------------
# 1. Prompt words and their CLIP tokens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptWord:
    """One word of a tokenized text (a piece of CLIP's pre-tokenizer) and its token positions."""

    text: str
    token_positions: tuple[int, ...]


def words_with_token_positions(tokenizer: Any, text: str) -> list[PromptWord]:
    """Split ``text`` into CLIP words, each with the positions of its tokens (0 is ``<|startoftext|>``).

    CLIP's BPE marks the last token of every word with ``</w>``, so grouping tokens up to each
    such mark recovers the words exactly as the text encoder sees them. Positions past the
    tokenizer's length limit are kept: the caller decides what truncation means.
    """
    token_ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    words: list[PromptWord] = []
    pieces: list[str] = []
    positions: list[int] = []
    for position, token in enumerate(tokens, start=1):
        pieces.append(token)
        positions.append(position)
        if token.endswith("</w>"):
            words.append(PromptWord("".join(pieces)[: -len("</w>")].lower(), tuple(positions)))
            pieces, positions = [], []
    if pieces:
        words.append(PromptWord("".join(pieces).lower(), tuple(positions)))
    return words


def content_words(words: Sequence[PromptWord]) -> list[PromptWord]:
    """Keep the words that describe an object or an attribute (drop articles, prepositions, ...)."""
    return [word for word in words if word.text not in NON_CONTENT_WORDS and re.search(r"\w", word.text)]


@dataclass
class CaptionPlacement:
    """Where a caption's content words sit in the prompt's tokens.

    ``prompt_positions[k]`` and ``caption_positions[k]`` are the same word, in the prompt's and
    in the caption's own tokenization (the latter is what the embedding swap reads).
    """

    prompt_positions: list[int]
    caption_positions: list[int]
    missing_words: list[str]
    truncated_words: list[str]


def place_caption(
    prompt_words: Sequence[PromptWord], caption_words: Sequence[PromptWord], max_length: int
) -> CaptionPlacement:
    """Match a caption's content words to occurrences in the prompt.

    A word that occurs several times in the prompt ("a red cube and a red ball") is matched to
    the occurrence nearest to the caption's last content word (its head noun, in English), so each
    caption claims the words of its own phrase. ``max_length`` is the tokenizer's limit: a word
    whose tokens fall at or past ``max_length - 1`` was cut off by truncation.
    """
    wanted = content_words(caption_words)
    prompt_content = content_words(prompt_words)
    occurrences = {word.text: [i for i, p in enumerate(prompt_content) if p.text == word.text] for word in wanted}
    missing = [word.text for word in wanted if not occurrences[word.text]]
    anchors = occurrences.get(wanted[-1].text, []) if wanted else []
    if not anchors:
        # No head noun in the prompt: anchor each word on its own first occurrence.
        anchors = [0]
    best: list[tuple[PromptWord, PromptWord]] | None = None
    best_cost: tuple[float, int] = (math.inf, 0)
    for anchor in anchors:
        matched: list[tuple[PromptWord, PromptWord]] = []
        distance, modifiers_after_noun = 0, 0
        for word in wanted:
            candidates = occurrences[word.text]
            if not candidates:
                continue
            # Prefer the occurrence before the anchor on ties: modifiers precede the noun.
            index = min(candidates, key=lambda c: (abs(c - anchor), c > anchor))
            distance += abs(index - anchor)
            modifiers_after_noun += index > anchor
            matched.append((word, prompt_content[index]))
        # Equal distances ("a blue circle" in "a red circle and a blue circle": "blue" is one word from
        # either "circle") go to the anchor whose modifiers come before it, as English puts them.
        cost = (distance, modifiers_after_noun)
        if cost < best_cost:
            best, best_cost = matched, cost
    prompt_positions: list[int] = []
    caption_positions: list[int] = []
    truncated: list[str] = []
    for caption_word, prompt_word in best or []:
        kept = [p for p in prompt_word.token_positions if p < max_length - 1]
        if len(kept) < len(prompt_word.token_positions):
            truncated.append(prompt_word.text)
            continue
        prompt_positions.extend(kept)
        # A word's tokens are identical in both tokenizations, so positions pair one to one.
        caption_positions.extend(caption_word.token_positions[: len(kept)])
    return CaptionPlacement(prompt_positions, caption_positions, missing, truncated)


# ---------------------------------------------------------------------------------------------
# 2. Dense captioners (image + prompt -> local captions)
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalCaption:
    """A local caption: one object with its attributes, and an optional box hint (normalised xyxy)."""

    text: str
    box: tuple[float, float, float, float] | None = None


@runtime_checkable
class DenseCaptioner(Protocol):
    """Turns the coarse image and its prompt into local captions, one per object."""

    def __call__(self, image: PIL.Image.Image, prompt: str) -> list[str | LocalCaption]: ...


@runtime_checkable
class Grounder(Protocol):
    """Turns an image and captions into one mask per caption (``None`` where nothing was found)."""

    name: str

    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[MaskLike | None]: ...


class PromptPhraseCaptioner:
    """Local captions read off the prompt itself: its noun phrases ("a red book", "a yellow vase").

    RealignDiff asks an LLM for local captions; this rule-based captioner needs no model and is
    what a user with only diffusers gets. A phrase starts at a determiner (or, after "and", "with",
    a comma or a verb, at a bare noun: "... eating grass") and runs until a word that joins phrases:
    a preposition, "and" followed by a new determiner, punctuation, or a verb. "and" between
    adjectives ("black and white cat") and "of" inside an object ("a cup of coffee") stay inside.

    A closed list cannot hold every verb, so verbs are recognised by where they stand, which is how
    a reader parses a prompt: once a phrase has its head noun (a word that is neither a determiner
    nor a known adjective), a following word is a verb if it ends in -ing ("a boy kicking"), in -ed
    ("a car parked"), in -s after a singular determiner ("a chef cooks": "a" cannot take a plural
    noun), or is a form of a common verb ("the cat sleeps", "two dogs play", "the cat lay").
    "left"/"right" after a head noun ("a triangle left of a circle") also end a phrase. Known
    limits: a compound noun ending in -ing/-ed/-s after a singular determiner ("an office
    building" is kept by an exception list, "a city parks" is not English anyway).
    """

    determiners = frozenset(
        "a an the this that these those some any one two three four five six seven eight nine ten many several "
        "each every his her its their my our your".split()
    )
    singular_determiners = frozenset("a an one this that each every".split())
    plural_determiners = frozenset(
        "these those some two three four five six seven eight nine ten many several".split()
    )
    phrase_breaks = frozenset(
        "on in at to into onto from by for with without near next beside behind above below under over across "
        "through around along against toward towards among amid inside outside beneath underneath upon past "
        "within atop beyond during after before via alongside opposite than where who which whose while as of "
        "is are was were be been being has have had am".split()
    )
    bare_phrase_openers = frozenset(["and", "or", "with", ",", "<verb>"])
    attribute_words = frozenset(
        "red green blue yellow black white brown pink purple orange gray grey silver golden gold beige violet "
        "striped spotted dark light pale bright big small large tiny little huge giant old young new tall short "
        "long wide narrow fat thin round square oval flat heavy wooden metal metallic plastic glass leather rubber "
        "fabric wet dry clean dirty empty full happy sad cute fluffy soft hard shiny furry hairy curly broken hot "
        "cold warm fresh ripe open closed cubic rectangular circular triangular cylindrical spherical".split()
    )
    # Base forms of common verbs; their -s, -es, -ing, -ed forms are found by stripping the suffix.
    verb_stems = frozenset(
        "sit stand lie lay run walk eat drink hold play read sleep cook look watch ride jump fly swim carry chase "
        "kick throw catch wait rest hang lean face pull push wear grow float stare smile climb cross drive paint "
        "write sing dance feed follow park stop perch fill cover wag bark chew fetch hug kiss greet talk laugh cry "
        "nap dig build fix wash clean cut slice pour serve hunt graze roam wander soar land sail row surf ski skate "
        "sip lick bite peek hide crawl shine glow sit pose fall sleep kneel sniff carry perform practice stretch "
        "hope keep make take give see".split()
    )
    irregular_verbs = frozenset(
        "sat stood lay lies lain ran ate eaten drank flew flown held rode ridden swam threw thrown caught sang "
        "wore worn grew grown hung fell fallen slept knelt dug built fed bit bitten hid hidden shone made took "
        "taken gave given saw seen kept".split()
    )
    # Nouns that look like verb forms after another noun ("an office building", "a flower bed").
    nouns_like_verbs = frozenset(
        "building ceiling painting clothing railing awning evening morning pudding icing frosting earring sibling "
        "wedding stocking dumpling topping filling lightning bed shed sled seed weed reed".split()
    )
    # -ing words that name a kind of thing when a noun follows ("a parking sign", "a bowling ball").
    ing_modifiers = frozenset(
        "parking bowling swimming dining washing fishing sleeping running baking cutting frying living waiting "
        "shopping walking cooking drinking sewing writing reading racing sailing rocking folding".split()
    )

    def __call__(self, image: PIL.Image.Image | None, prompt: str) -> list[str]:
        return self.phrases(prompt)

    def _is_verb_form(self, word: str) -> bool:
        """Whether ``word`` is a form of a known verb (``verb_stems`` or ``irregular_verbs``)."""
        if word in self.irregular_verbs:
            return True
        candidates = {word}
        for suffix, replacements in (("ing", ("", "e")), ("ies", ("y",)), ("es", ("",)), ("s", ("",))):
            if word.endswith(suffix):
                candidates.update(word[: -len(suffix)] + r for r in replacements)
        for suffix, replacements in (("ied", ("y",)), ("ed", ("", "e"))):
            if word.endswith(suffix):
                candidates.update(word[: -len(suffix)] + r for r in replacements)
        # A doubled final consonant ("running", "stopped") is undone too.
        candidates.update(c[:-1] for c in list(candidates) if len(c) > 2 and c[-1] == c[-2])
        return bool(candidates & self.verb_stems)

    def _is_verb_after_head(self, word: str, following: str, determiner: str, plural: bool) -> bool:
        """Whether ``word``, right after a phrase's head noun, is a verb (see the class docstring)."""
        if "'" in word or word in self.nouns_like_verbs and following not in self.determiners:
            return False
        followed_by_noun = bool(re.match(r"\w", following)) and following not in NON_CONTENT_WORDS
        if word in self.ing_modifiers and followed_by_noun and following not in self.determiners:
            return False
        if word in self.irregular_verbs or (self._is_verb_form(word) and (word not in self.verb_stems or plural)):
            # A bare stem is a verb only after a plural subject ("two dogs play"; "a bus stop" is a noun).
            return True
        if word.endswith("ing") and len(word) > 5 and re.search(r"[aeiouy]", word[:-3]):
            return True
        if word.endswith("ed") and not word.endswith("eed") and len(word) > 4:
            return True
        is_third_person = word.endswith("s") and not re.search(r"(ss|us|is|as|os)$", word) and len(word) > 3
        return is_third_person and determiner in self.singular_determiners

    def phrases(self, prompt: str) -> list[str]:
        """Split ``prompt`` into its object phrases."""
        tokens = re.findall(r"[\w'-]+|[^\w\s]", prompt)
        phrases: list[list[str]] = []
        current: list[str] = []
        last_break = ""
        # The current phrase's determiner, and whether its head noun has been seen (since its last "of").
        determiner, has_head, plural = "", False, False
        for index, token in enumerate(tokens):
            word = token.lower()
            previous = current[-1].lower() if current else ""
            following = tokens[index + 1].lower() if index + 1 < len(tokens) else ""
            starts_phrase = word in self.determiners and previous not in self.determiners
            # "and" joins two attributes of one object ("black and white cat") or two objects.
            joins_attributes = previous in self.attribute_words and following in self.attribute_words
            # A word in -ing right after "and" or at a phrase boundary is a verb ("... and reading").
            is_verb = word.endswith("ing") and index > 0 and (not current or previous in ("and", "or"))
            if current and has_head and re.match(r"\w", token):
                is_verb = is_verb or self._is_verb_after_head(word, following, determiner, plural)
            ends_at_side = word in ("left", "right") and has_head
            # "of" inside an object ("a slice of cheese") rather than between two ("a statue of a bird").
            of_inside = word == "of" and current and previous not in NON_CONTENT_WORDS
            of_inside = of_inside and following not in self.determiners
            if starts_phrase:
                if current:
                    phrases.append(current)
                current = [token]
                determiner, has_head, plural = word, False, word in self.plural_determiners
            elif of_inside:
                current.append(token)
                has_head = False  # the noun after "of" is a head of its own ("a pair of shoes")
            elif (
                not re.match(r"\w", token)
                or word in self.phrase_breaks
                or is_verb
                or ends_at_side
                or (word in ("and", "or") and not joins_attributes)
            ):
                if current:
                    phrases.append(current)
                current = []
                last_break = "<verb>" if is_verb else word
            elif current or not phrases:
                current.append(token)
                has_head, plural = self._head_after(word, has_head, plural)
            elif last_break in self.bare_phrase_openers and not word.endswith("ly"):
                current = [token]  # a phrase with no determiner ("... and yellow bananas", "... eating grass")
                determiner = ""
                has_head, plural = self._head_after(word, False, False)
        if current:
            phrases.append(current)
        cleaned = []
        for words in phrases:
            while words and words[-1].lower() in ("and", "or"):
                words = words[:-1]
            lowered = [w.lower() for w in words]
            # A bare phrase of adjectives only ("... stood tall") names no object.
            names_nothing = lowered and lowered[0] not in self.determiners
            names_nothing = names_nothing and all(w in self.attribute_words or w in NON_CONTENT_WORDS for w in lowered)
            if any(w not in NON_CONTENT_WORDS for w in lowered) and not names_nothing:
                cleaned.append(" ".join(words))
        return cleaned

    def _head_after(self, word: str, has_head: bool, plural: bool) -> tuple[bool, bool]:
        """Update (head noun seen, plural) of a phrase after appending ``word``."""
        if word in self.attribute_words or word in NON_CONTENT_WORDS or word in self.determiners:
            return has_head, plural
        # A plural determiner ("two") or a head ending in -s (not -ss/-us: "dogs") makes the phrase plural.
        return True, plural or bool(re.search(r"[^su]s$", word))


# ---------------------------------------------------------------------------------------------
# 3. Masks
# ---------------------------------------------------------------------------------------------


def mask_to_tensor(mask: MaskLike, height: int, width: int, argument: str = "mask") -> torch.Tensor:
    """Convert a PIL, numpy or torch mask of any size to a bool (height, width) tensor on the CPU.

    Soft masks are resized bilinearly and cut at 0.5. 8-bit images (PIL, uint8) are read as 0-255 and scaled to
    [0, 1], unless their maximum is 1: then they are 0/1 masks (``np.uint8`` arrays of 0 and 1 are common, and
    dividing them by 255 would leave nothing above 0.5).
    """
    if isinstance(mask, PIL.Image.Image):
        tensor = torch.from_numpy(np.array(mask.convert("L"), dtype=np.uint8))
    elif isinstance(mask, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(mask))
    elif isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
    else:
        raise ValueError(
            f"`{argument}` must be a PIL image, a numpy array or a torch tensor, got {type(mask).__name__}."
        )
    tensor = tensor.squeeze()
    if tensor.ndim != 2:
        raise ValueError(f"`{argument}` must be a single-channel 2-D mask, got shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif tensor.dtype == torch.uint8:
        is_zero_one = tensor.numel() == 0 or int(tensor.max()) <= 1
        tensor = tensor.float() if is_zero_one else tensor.float() / 255.0
    else:
        tensor = tensor.float()
    resized = F.interpolate(tensor[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return resized >= 0.5


def partition_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Turn possibly overlapping bool masks into a label map: region index per pixel, -1 for none.

    Overlaps go to the smaller mask: a small object drawn over a large one (a cup on a table)
    keeps its pixels, which is what the re-weighting needs to give it its own words.
    """
    if not masks:
        raise ValueError("partition_masks needs at least one mask")
    labels = torch.full(masks[0].shape, -1, dtype=torch.long)
    areas = [int(mask.sum()) for mask in masks]
    for index in sorted(range(len(masks)), key=lambda i: -areas[i]):
        labels[masks[index]] = index
    return labels


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold (1979) of values in [0, 1]: the cut maximising between-class variance."""
    histogram = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0).double()
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight_low = histogram.cumsum(0)
    weight_high = histogram.sum() - weight_low
    mean_low = (histogram * centers).cumsum(0) / weight_low.clamp(min=1e-12)
    mean_high = ((histogram * centers).sum() - (histogram * centers).cumsum(0)) / weight_high.clamp(min=1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float((torch.argmax(between[:-1]) + 1) / bins)


def masks_from_attention_maps(
    attention_maps: torch.Tensor, token_groups: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Masks from one image's cross-attention maps (``(h, w, num_tokens)``), one per token group.

    As in Prompt-to-Prompt and DAAM: average each region's token maps, normalise to [0, 1], cut at
    Otsu's threshold, and give each pixel to the strongest region among those above their cut.
    Returns bool ``(h, w)`` masks; a region that wins no pixel gets an all-False mask.
    """
    if not token_groups:
        return []
    region_maps = []
    for tokens in token_groups:
        region_map = attention_maps[..., list(tokens)].float().mean(-1)
        low, high = region_map.min(), region_map.max()
        region_maps.append((region_map - low) / (high - low).clamp(min=1e-8))
    stacked = torch.stack(region_maps)
    above = torch.stack([m >= otsu_threshold(m) for m in region_maps])
    strongest = torch.where(above, stacked, torch.full_like(stacked, -1.0)).argmax(0)
    claimed = above.any(0)
    return [(strongest == index) & claimed for index in range(len(token_groups))]


def attention_map_grid(grids: Sequence[tuple[int, int]], latent_size: tuple[int, int]) -> tuple[int, int]:
    """The attention resolution whose maps make object masks: 16×16 cells for SD 1.5 at 512 px.

    Prompt-to-Prompt and DAAM read the UNet's middle resolution, a quarter of the latent side (16×16 of SD's
    64×64 latents). Small models would then read very coarse maps (4×4 for the shapes world's 16×16 latents,
    8×8 for SD at 256 px), so the target is at least 16×16 cells wherever a grid that fine exists. Of
    ``grids``, the nearest to the target in log scale is chosen, the finer on a tie.
    """
    if not grids:
        raise ValueError("no cross-attention maps were recorded: the UNet has no cross-attention layers")
    finest = max(height * width for height, width in grids)
    target = max(latent_size[0] * latent_size[1] / 16, min(256, finest))
    return min(grids, key=lambda g: (abs(math.log2(g[0] * g[1] / target)), -g[0] * g[1]))


# ---------------------------------------------------------------------------------------------
# 4. Attention: the re-weighting, the recorder, the per-call state and the processor
# ---------------------------------------------------------------------------------------------


def reweighted_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    strength: torch.Tensor,
    query_regions: torch.Tensor,
    key_regions: torch.Tensor,
) -> torch.Tensor:
    """Re-weighting attention modulation, materialised (DenseDiffusion, Kim et al. 2023, Eq. 5-6).

    RealignDiff (arXiv 2305.19599, Sec. 3.2) adopts it. With scores ``S = scale * Q Kᵀ`` and
    ``M_ij = 1`` where key ``j`` belongs to the region holding query ``i``:

        S'_ij = S_ij + λ_i M_ij (max_i S − S_ij) − λ_i (1 − M_ij) (S_ij − min_i S)

    and the output is ``softmax(S') V``.

    Shapes: query ``(B, heads, N, d)``, key/value ``(B, heads, K, d)``, ``strength`` λ ``(B, N)``,
    ``query_regions`` one-hot ``(B, N, R)`` (a row of zeros: the pixel is in no region),
    ``key_regions`` ``(B, K, R)`` (for self-attention the same one-hot as the queries; for cross-
    attention, which text tokens each region owns). Scores are computed in float32.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    row_max = scores.amax(dim=-1, keepdim=True)
    row_min = scores.amin(dim=-1, keepdim=True)
    same_region = torch.matmul(query_regions.float(), key_regions.float().transpose(-1, -2)).clamp(max=1.0)[:, None]
    lam = strength.float()[:, None, :, None]
    scores = scores + lam * same_region * (row_max - scores) - lam * (1.0 - same_region) * (scores - row_min)
    return torch.matmul(scores.softmax(dim=-1), value.float()).to(value.dtype)


# The same modulation without the N×K matrix (issue D): a per-row query scale plus a rank-R bias that
# fits in R extra query/key channels of one fused SDPA call. DenseDiffusion Eq. 5-6 expands to
#     softmax_j(S'_ij) = softmax_j((1 − λ_i) S_ij + λ_i range_i M_ij),   range_i = max_j S_ij − min_j S_ij
# (the per-row constant λ_i·min_i drops out of the softmax), and with M = m·cᵀ (m the (N, R) one-hot
# regions of the queries, c the (K, R) regions of the keys):
#     q'_i = [(1 − λ_i) q_i, λ_i range_i / s · m_i],   k'_j = [k_j, c_j],   s·q'_i·k'_j = logit_ij.
# Only range_i needs the scores: one chunked pass over QKᵀ for the modulated rows.

# Fused kernels want the head size a multiple of 8 (CUDA flash / memory-efficient kernels pad, i.e.
# copy, q/k/v otherwise; 8 fp32 or 16 fp16 values is also one AVX/AVX-512 vector on the CPU).
HEAD_SIZE_MULTIPLE = 8


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _default_chunk_elements(device: torch.device) -> int:
    """How many scores the row-range pass holds at once.

    On the CPU a chunk should stay in cache: 2 M fp32 scores (8 MiB, 64 query rows of an 8-head 64×64
    layer) measured fastest on a 2-core EPYC, 8 M about 5% slower. A GPU wants fewer, larger launches;
    2^25 scores (64 MiB in fp16) stays a few percent of an SD 1.5 step's memory.
    """
    return 1 << 25 if device.type == "cuda" else 1 << 21


def score_row_range(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float,
    rows: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``max_j S_ij − min_j S_ij`` of the scores ``S = scale·QKᵀ`` of one batch item, in float32.

    ``query`` ``(heads, N, d)``, ``key`` ``(heads, K, d)``; ``rows`` (long, optional) picks the query rows
    whose range is wanted; returns ``(heads, len(rows))`` (or ``(heads, N)``). Queries are taken in
    chunks of at most ``chunk_elements`` scores, so memory stays O(chunk) whatever N is.
    Half-precision inputs are multiplied in their own dtype (tensor-core speed) and accumulate in float32
    inside the kernel; float32 inputs give the reference's float32 scores.

    Under autograd the pass records which key holds each row's max and min and the range is recomputed
    from those two keys, ``s·q_i·(k_argmax − k_argmin)``: the same value and the same gradient as
    ``amax − amin`` of the materialised scores (up to ties), in O(N·d) memory.
    """
    if rows is not None:
        query = query[:, rows]
    heads, num_rows, _ = query.shape
    num_keys = key.shape[1]
    if chunk_elements is None:
        chunk_elements = _default_chunk_elements(query.device)
    chunk = max(1, min(num_rows, chunk_elements // max(1, heads * num_keys)))
    differentiable = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    if torch.compiler.is_compiling() and not differentiable:
        return _score_row_range_traced(query, key, scale=scale, chunk=chunk)
    with torch.no_grad():
        key_t = key.transpose(1, 2)
        shape = dict(size=(heads, num_rows), device=query.device)
        row_max, row_min = torch.empty(**shape, dtype=query.dtype), torch.empty(**shape, dtype=query.dtype)
        if differentiable:
            max_index, min_index = torch.empty(**shape, dtype=torch.long), torch.empty(**shape, dtype=torch.long)
        scores = torch.empty(heads, chunk, num_keys, device=query.device, dtype=query.dtype)
        for start in range(0, num_rows, chunk):
            stop = min(start + chunk, num_rows)
            block = scores[:, : stop - start]
            torch.bmm(query[:, start:stop], key_t, out=block)
            if differentiable:
                torch.max(block, dim=-1, out=(row_max[:, start:stop], max_index[:, start:stop]))
                torch.min(block, dim=-1, out=(row_min[:, start:stop], min_index[:, start:stop]))
            else:
                # amax and amin separately: a fused aminmax, or max with indices, measured 5-10x slower here.
                torch.amax(block, dim=-1, out=row_max[:, start:stop])
                torch.amin(block, dim=-1, out=row_min[:, start:stop])
    if differentiable:
        head_dim = key.shape[-1]
        key_max = key.gather(1, max_index[..., None].expand(-1, -1, head_dim))
        key_min = key.gather(1, min_index[..., None].expand(-1, -1, head_dim))
        return ((query * (key_max - key_min)).sum(-1) * scale).float()
    # scale > 0, so it commutes with max and min: one multiply per row instead of one per score.
    return (row_max.float() - row_min.float()) * scale


def _score_row_range_traced(query: torch.Tensor, key: torch.Tensor, *, scale: float, chunk: int) -> torch.Tensor:
    """``score_row_range``'s chunked pass written for torch.compile: the same chunks and the same float32
    difference, without ``out=`` into views (which dynamo cannot trace); the compiler plans the buffers and
    can fuse each chunk's ``amax`` and ``amin`` into one read of its scores."""
    key_t = key.transpose(1, 2)
    ranges = []
    for start in range(0, query.shape[1], chunk):
        block = torch.bmm(query[:, start : start + chunk], key_t)
        ranges.append(block.amax(dim=-1).float() - block.amin(dim=-1).float())
    return torch.cat(ranges, dim=1) * scale


def widened_query_key_value(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    strength: torch.Tensor,
    row_range: torch.Tensor,
    query_regions: torch.Tensor,
    key_regions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q' = [(1−λ)q, λ·range/s·m, 0]``, ``k' = [k, c, 0]``, ``v' = [v, 0]``, all of one head size.

    The head size is ``d + R`` rounded up to a multiple of 8; ``v`` gets zero channels too because the
    fused CPU and CUDA flash kernels want q, k and v of one head size (with ``v`` narrower, PyTorch
    falls back to the math kernel, which materialises the N × K scores). The extra output channels
    are zero and the caller drops them.
    """
    batch, heads, num_queries, head_dim = query.shape
    num_keys = key.shape[2]
    num_regions = query_regions.shape[-1]
    width = _round_up(head_dim + num_regions, HEAD_SIZE_MULTIPLE)
    bias_end = head_dim + num_regions
    # Laid out (B, N, heads, width) and viewed as (B, heads, N, width), like diffusers' own q/k/v: SDPA's
    # kernels take these strides as they are, and the copies below read the projections' memory in order.
    query_wide = query.new_empty(batch, num_queries, heads, width).transpose(1, 2)
    key_wide = key.new_empty(batch, num_keys, heads, width).transpose(1, 2)
    value_wide = value.new_empty(batch, num_keys, heads, width).transpose(1, 2)
    lam = strength.to(torch.float32)[:, None, :, None]
    keep = (1.0 - lam).to(query.dtype)
    if (torch.is_grad_enabled() and query.requires_grad) or torch.compiler.is_compiling():
        query_wide[..., :head_dim] = query * keep  # out= has no autograd, and dynamo cannot trace it into a view
    else:
        torch.mul(query, keep, out=query_wide[..., :head_dim])  # one pass, no temporary
    bias = (lam * row_range[..., None]) * (query_regions.to(torch.float32)[:, None] / scale)
    query_wide[..., head_dim:bias_end] = bias
    key_wide[..., :head_dim] = key
    key_wide[..., head_dim:bias_end] = key_regions[:, None]
    value_wide[..., :head_dim] = value
    for tensor in (query_wide[..., bias_end:], key_wide[..., bias_end:], value_wide[..., head_dim:]):
        tensor.zero_()
    return query_wide, key_wide, value_wide


def reweighted_attention_fast(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    strength: torch.Tensor,
    query_regions: torch.Tensor,
    key_regions: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Re-weighting attention modulation (DenseDiffusion Eq. 5-6, RealignDiff Sec. 3.2) in one fused SDPA call.

    Same inputs and output as ``reweighted_attention_reference``: query ``(B, heads, N, d)``, key/value
    ``(B, heads, K, d)``, ``strength`` λ ``(B, N)``, ``query_regions`` one-hot ``(B, N, R)`` (at most one 1
    per row, i.e. a partition; a row of zeros: the pixel is in no region), ``key_regions`` ``(B, K, R)``.
    Computes ``softmax_j((1 − λ_i) S_ij + λ_i range_i M_ij) V`` as an unmasked SDPA over R extra
    query/key channels (see the module docstring), after an exact chunked pass for ``range_i`` over
    the modulated rows only. Never materialises an ``N × K`` matrix; ``chunk_elements`` bounds the
    scores the range pass holds at once.
    """
    batch, heads, num_queries, head_dim = query.shape
    if torch.compiler.is_compiling():
        # One graph whatever the layout and the step: no data-dependent branch or row selection. Rows with λ = 0
        # get a range they do not use (their bias is λ·range = 0), and λ = 0 everywhere is plain attention.
        row_range = score_row_range(
            query.reshape(batch * heads, num_queries, head_dim),
            key.reshape(batch * heads, key.shape[2], head_dim),
            scale=scale,
            chunk_elements=chunk_elements,
        ).view(batch, heads, num_queries)
        return _widened_attention(query, key, value, scale, strength, row_range, query_regions, key_regions)
    active = strength > 0
    if not bool(active.any()):
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    # Built by scatter rather than in place, so autograd can follow the ranges back to q and k.
    ranges_per_item = []
    for index in range(batch):
        rows = active[index].nonzero().squeeze(-1)
        if rows.numel() == num_queries:
            rows = None
        ranges = score_row_range(query[index], key[index], scale=scale, rows=rows, chunk_elements=chunk_elements)
        if rows is not None:
            ranges = ranges.new_zeros(heads, num_queries).index_copy(1, rows, ranges)
        ranges_per_item.append(ranges)
    row_range = torch.stack(ranges_per_item)
    return _widened_attention(query, key, value, scale, strength, row_range, query_regions, key_regions)


def _widened_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    strength: torch.Tensor,
    row_range: torch.Tensor,
    query_regions: torch.Tensor,
    key_regions: torch.Tensor,
) -> torch.Tensor:
    """The fused SDPA call over ``widened_query_key_value``'s q′, k′, v′, with the padding channels dropped."""
    query_wide, key_wide, value_wide = widened_query_key_value(
        query,
        key,
        value,
        scale=scale,
        strength=strength,
        row_range=row_range,
        query_regions=query_regions,
        key_regions=key_regions,
    )
    output = F.scaled_dot_product_attention(query_wide, key_wide, value_wide, scale=scale)
    return output[..., : query.shape[-1]]


AttentionFunction = Callable[..., torch.Tensor]

ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFunction] = {
    "fast": reweighted_attention_fast,
    "reference": reweighted_attention_reference,
}


def attention_grid_size(num_pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with ``num_pixels`` queries in a UNet on ``latent_size``.

    The UNet halves its feature maps with stride-2 convolutions (``ceil(n / 2)``), so the grid is
    found by halving the latent size until the pixel count matches; non-square sizes work too.
    """
    height, width = latent_size
    while height * width > num_pixels:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != num_pixels:
        raise ValueError(f"cannot place {num_pixels} attention queries on a grid derived from latents {latent_size}")
    return height, width


class CrossAttentionRecorder:
    """Collects cross-attention probabilities of the conditional batch, per attention resolution.

    Each record is averaged over heads; records are summed over layers and steps and averaged in
    ``mean_maps``. ``keep_graph=True`` keeps them differentiable (CoMat's attribute concentration
    loss during reward fine-tuning); otherwise they are detached.
    """

    def __init__(self, keep_graph: bool = False) -> None:
        self.keep_graph = keep_graph
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        # 0-d tensors, not ints: under torch.compile an int read in the graph is a guard on its value, which every
        # step would change (a new graph per step); a tensor count is a graph input like the sums.
        self.counts: dict[tuple[int, int], torch.Tensor] = {}

    def record(self, probabilities: torch.Tensor, grid: tuple[int, int]) -> None:
        """Add ``probabilities`` of shape (B, heads, h*w, tokens) for one layer call."""
        maps = probabilities.mean(dim=1)
        if not self.keep_graph:
            maps = maps.detach().float()
        if grid in self.sums:
            self.sums[grid] = self.sums[grid] + maps
            self.counts[grid] = self.counts[grid] + 1
        else:
            self.sums[grid] = maps
            self.counts[grid] = torch.ones((), device=maps.device)

    def mean_maps(self) -> dict[tuple[int, int], torch.Tensor]:
        """Average maps per resolution: ``(h, w) -> (B, h, w, tokens)``."""
        return {
            grid: (total / self.counts[grid]).reshape(total.shape[0], grid[0], grid[1], total.shape[-1])
            for grid, total in self.sums.items()
        }


@dataclass
class RegionTensors:
    """A batch of layouts as tensors for the processor (one entry per conditional batch item).

    ``labels``: ``(B, H, W)`` long at image resolution, region index or -1.
    ``region_tokens``: ``(B, R, tokens)`` bool, the prompt tokens each region owns.
    """

    labels: torch.Tensor
    region_tokens: torch.Tensor


@dataclass
class AttentionModulationState:
    """Everything the attention processor needs for one pipeline call; passed per call through
    ``cross_attention_kwargs={"realign_state": state}``. The denoising loop updates ``timestep``
    and ``modulate`` at each step; nothing is stored in the processor or in globals.

    Under ``torch.compile`` give ``timestep`` and ``modulate`` as 0-d tensors (the pipeline's loop does): a
    Python float or bool read inside the compiled UNet is a guard on its value, so every new step would
    compile a new graph. As tensors they are graph inputs, the switch is folded into λ (λ = 0 is plain
    attention), and every step of a run, modulated or not, runs one graph.
    """

    latent_size: tuple[int, int]
    regions: RegionTensors | None = None
    cross_attention_weight: float = 1.0
    self_attention_weight: float = 0.3
    area_weight: float = 1.0
    timestep: float | torch.Tensor = 1000.0
    num_train_timesteps: int = 1000
    modulate: bool | torch.Tensor = False
    conditional_half_only: bool = True
    # The re-weighting function for this call (``reweighted_attention_fast`` or ``_reference``); ``None`` uses the
    # processor's own. Per call, so concurrent calls asking for different implementations share one processor.
    attention_function: AttentionFunction | None = None
    recorder: CrossAttentionRecorder | None = None
    # Region one-hots and area factors per attention grid, built on first use (same device and
    # dtype as the attention inputs). A cache, not state: it depends only on ``regions``.
    per_grid: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    def time_factor(self) -> float | torch.Tensor:
        """DenseDiffusion's time decay ``c(t) = (t / T) ** 5``: strong early, gone by the end.

        A float for a float ``timestep``, a 0-d tensor for a tensor one (no ``float()``: that would end a graph).
        """
        return (self.timestep / self.num_train_timesteps) ** 5

    def regions_on_grid(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot regions ``(B, h*w, R)`` and area factors ``ρ = 1 − w_area·area/(h·w)`` ``(B, h*w)``.

        Labels are resized by area interpolation of their one-hot planes (with "no region" as a
        plane of its own) and each cell takes the majority label, so the result is still a
        partition at every resolution.
        """
        cache_key = (grid[0], grid[1], torch.device(device), dtype)
        # Inside a compiled graph the cache is neither read nor filled: computed in the graph (a few small ops), so
        # the graph holds no guard on this dict, whose keys an eager call with the same state may change.
        if torch.compiler.is_compiling() or cache_key not in self.per_grid:
            labels = self.regions.labels
            num_regions = self.regions.region_tokens.shape[1]
            planes = F.one_hot(labels + 1, num_regions + 1).permute(0, 3, 1, 2).float()
            resized = F.interpolate(planes, size=grid, mode="area").argmax(dim=1) - 1
            flat = resized.flatten(1)
            one_hot = F.one_hot(flat.clamp(min=0), num_regions).float() * (flat >= 0)[..., None]
            area = one_hot.sum(dim=1, keepdim=True) / flat.shape[1]
            area_of_pixel = (one_hot * area).sum(-1)
            # Clamped at 0: with area_weight > 1 a large region would otherwise flip the modulation.
            area_factor = (1.0 - self.area_weight * area_of_pixel).clamp(min=0.0) * (flat >= 0)
            on_grid = (one_hot.to(device, dtype), area_factor.to(device, dtype))
            if torch.compiler.is_compiling():
                return on_grid
            self.per_grid[cache_key] = on_grid
        return self.per_grid[cache_key]


class RealignAttnProcessor:
    """Attention processor for every UNet attention layer (self ``attn1`` and cross ``attn2``).

    With no ``realign_state`` it computes exactly what diffusers' ``AttnProcessor2_0`` computes.
    With a state it records cross-attention maps (if asked) and, while ``state.modulate`` is on,
    re-weights the conditional half of the batch with ``attention_function`` (the fused
    ``reweighted_attention_fast`` by default; ``reweighted_attention_reference`` or any function with the
    same signature works).

    ``torch.compile(unet)`` traces it into the UNet's one graph (no graph break): with the state's ``timestep``
    and ``modulate`` as 0-d tensors every step of a run, re-weighted or not, runs that graph
    (``tests/test_compile.py``).
    """

    def __init__(self, attention_function: AttentionFunction = reweighted_attention_fast) -> None:
        self.attention_function = attention_function

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        realign_state: AttentionModulationState | None = None,
    ) -> torch.Tensor:
        is_cross_attention = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if realign_state is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            hidden_states = self._realign(attn, query, key, value, attention_mask, is_cross_attention, realign_state)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _realign(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_cross_attention: bool,
        state: AttentionModulationState,
    ) -> torch.Tensor:
        """Record and re-weight the conditional batch items; the unconditional half stays plain.

        When modulating, plain attention runs on the unconditional items only: computing it for the
        whole batch and then the conditional half again cost 1.67× the floor per self-attention layer.
        """
        batch_size = query.shape[0]
        start = batch_size // 2 if state.conditional_half_only else 0
        grid = attention_grid_size(query.shape[2], state.latent_size)

        if is_cross_attention and state.recorder is not None:
            scores = torch.matmul(query[start:], key[start:].transpose(-1, -2)) * attn.scale
            state.recorder.record(scores.float().softmax(dim=-1), grid)

        weight = state.cross_attention_weight if is_cross_attention else state.self_attention_weight
        # Compiled, with the step's switch a tensor: no branch on it (a graph break), λ is multiplied by it instead.
        switch_in_graph = torch.compiler.is_compiling() and isinstance(state.modulate, torch.Tensor)
        if (not switch_in_graph and not state.modulate) or state.regions is None or weight == 0.0:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        if attention_mask is not None:
            raise ValueError("RealignAttnProcessor cannot re-weight attention that also has an `attention_mask`.")

        query_regions, area_factor = state.regions_on_grid(grid, query.device, query.dtype)
        if query_regions.shape[0] != batch_size - start:
            raise ValueError(
                f"the layout has {query_regions.shape[0]} entries but the conditional batch has {batch_size - start}"
            )
        if is_cross_attention:
            key_regions = state.regions.region_tokens.transpose(1, 2).to(query.device, query.dtype)
            if key_regions.shape[1] != key.shape[2]:
                raise ValueError(
                    f"the layout covers {key_regions.shape[1]} text tokens but attention sees {key.shape[2]}"
                )
        else:
            key_regions = query_regions
        strength = weight * state.time_factor() * area_factor
        if switch_in_graph:
            strength = strength * state.modulate
        attention_function = state.attention_function or self.attention_function
        modulated = attention_function(
            query[start:],
            key[start:],
            value[start:],
            scale=attn.scale,
            strength=strength,
            query_regions=query_regions,
            key_regions=key_regions,
        )
        if start == 0:
            return modulated.to(value.dtype)
        plain = F.scaled_dot_product_attention(query[:start], key[:start], value[:start], dropout_p=0.0)
        return torch.cat([plain, modulated.to(plain.dtype)], dim=0)


# Processors that compute plain attention and can be replaced without changing any result. Attention slicing
# only saves memory, which scaled_dot_product_attention (and the re-weighting's chunked pass) also does.
REPLACEABLE_PROCESSORS = (
    "AttnProcessor",
    "AttnProcessor2_0",
    "FusedAttnProcessor2_0",
    "XFormersAttnProcessor",
    "SlicedAttnProcessor",
)


def refuse_foreign_processors(unet: UNet2DConditionModel) -> None:
    """Raise if ``unet`` has attention processors that do more than plain attention (IP-Adapter, custom ones):
    replacing them with ``RealignAttnProcessor`` would silently drop what they do."""
    # Compared by name: a copy of this file loaded through `custom_pipeline=` defines its own class.
    names = {type(p).__name__ for p in unet.attn_processors.values()}
    foreign = sorted(names - set(REPLACEABLE_PROCESSORS) - {"RealignAttnProcessor"})
    if foreign:
        raise ValueError(
            f"The UNet uses attention processors {foreign}, which RealignDiff's re-weighting would replace and "
            "lose. Remove them (`pipe.unload_ip_adapter()`, or `pipe.unet.set_attn_processor(AttnProcessor2_0())`), "
            "or run with `realign=False`, which is exactly `StableDiffusionPipeline`'s call and keeps them."
        )


def install_realign_processors(
    unet: UNet2DConditionModel, attention_function: AttentionFunction = reweighted_attention_fast
) -> None:
    """Put ``RealignAttnProcessor(attention_function)`` on every attention layer of ``unet`` and leave it there.

    Installed once, never swapped back: swapping per call let a concurrent call (another thread, or another
    pipeline sharing this UNet through ``from_pipe``) restore the plain processors in the middle of a re-weighted
    pass. Left installed it costs nothing: without a ``realign_state`` the processor computes exactly
    ``AttnProcessor2_0``'s attention. Does nothing when ``RealignAttnProcessor`` is already installed, whatever
    its ``attention_function``: a call picks its own through ``AttentionModulationState.attention_function``.
    """
    processors = list(unet.attn_processors.values())
    # Any RealignAttnProcessor will do: a call picks its re-weighting function through its state.
    if all(type(p).__name__ == "RealignAttnProcessor" for p in processors):
        return
    refuse_foreign_processors(unet)
    if any(type(p).__name__ == "SlicedAttnProcessor" for p in processors):
        warnings.warn(
            "RealignDiff: attention slicing is replaced by `RealignAttnProcessor` (scaled_dot_product_attention, "
            "which does not hold the full score matrix on memory-efficient kernels); results are unchanged.",
            stacklevel=3,
        )
    unet.set_attn_processor(RealignAttnProcessor(attention_function=attention_function))


@contextlib.contextmanager
def realign_processors_installed(
    unet: UNet2DConditionModel, processor: RealignAttnProcessor | None = None
) -> Iterator[RealignAttnProcessor]:
    """Install ``processor`` on every attention layer of ``unet`` and restore the old ones on exit.

    For single-threaded use on a UNet of one's own (training, benchmarks); ``RealignDiffPipeline`` uses
    ``install_realign_processors`` instead, which never swaps back. Refuses processors that do more than plain
    attention (``refuse_foreign_processors``).
    """
    processor = processor or RealignAttnProcessor()
    previous = unet.attn_processors
    refuse_foreign_processors(unet)
    unet.set_attn_processor(processor)
    try:
        yield processor
    finally:
        unet.set_attn_processor(previous)


# ---------------------------------------------------------------------------------------------
# 5. The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class Region:
    """One object of a layout: its caption, its mask and the prompt tokens it owns."""

    caption: str
    mask: torch.Tensor
    token_indices: list[int]
    source: str
    caption_token_indices: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None


@dataclass
class DroppedRegion:
    """A caption that was left out of the layout, and why."""

    caption: str
    reason: str


@dataclass
class Layout:
    """The regions used for one generated image, and those that were dropped."""

    prompt: str
    regions: list[Region]
    dropped: list[DroppedRegion] = field(default_factory=list)


@dataclass
class RealignDiffPipelineOutput(BaseOutput):
    """Output of ``RealignDiffPipeline``.

    Args:
        images: the final (fine-pass) images, as ``output_type`` asks.
        nsfw_content_detected: the safety checker's verdict per final image, or ``None``.
        coarse_images: the coarse-pass images (``None`` when the user gave ``regions``).
        layouts: one ``Layout`` per image: captions, masks, token indices, mask sources, drops.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    coarse_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    layouts: list[Layout] | None


RegionsArgument = Sequence[tuple[str, MaskLike]] | Sequence[Sequence[tuple[str, MaskLike]]]


class RealignDiffPipeline(StableDiffusionPipeline):
    r"""Stable Diffusion with RealignDiff's fine stage: re-weighted attention inside per-object masks.

    A call runs a coarse pass (plain attention), finds local captions on the coarse image with
    ``captioner`` and a mask for each with ``grounder``, then runs a fine pass from the same
    initial latents with re-weighted cross- and self-attention. Give ``regions`` to skip the coarse
    pass, or ``realign=False`` for exactly ``StableDiffusionPipeline``'s output.

    ``captioner`` and ``grounder`` are plain attributes (and ``__call__`` arguments), never registered
    components, so ``save_pretrained`` stays loadable by plain diffusers. Defaults: the
    ``PromptPhraseCaptioner`` and masks read from the coarse pass's cross-attention maps.

    Load the caption-reward fine-tuned UNet with
    ``RealignDiffPipeline.from_pretrained(base, realign_unet="org/repo")``.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        captioner: DenseCaptioner | None = None,
        grounder: Grounder | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.captioner = captioner
        self.grounder = grounder

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        realign_unet: str | Path | None = None,
        realign_unet_subfolder: str | None = "unet",
        **kwargs: Any,
    ) -> RealignDiffPipeline:
        """Load a Stable Diffusion pipeline, with the caption-reward fine-tuned UNet if ``realign_unet`` is given.

        ``realign_unet`` is a Hub repo id or a local folder holding a diffusers UNet (in
        ``realign_unet_subfolder``, ``"unet"`` by default; ``None`` if the folder itself is the UNet).
        It is loaded from safetensors only. Every other argument goes to
        ``StableDiffusionPipeline.from_pretrained``.
        """
        for name in ("dtype", "torch_dtype"):
            if isinstance(kwargs.get(name), str):
                # Accept "float16" as well as torch.float16, so a three-line script needs no torch import.
                dtype = getattr(torch, kwargs[name], None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(
                        f"`{name}` must be a torch dtype or its name (e.g. 'float16'), got {kwargs[name]!r}."
                    )
                kwargs[name] = dtype
        if realign_unet is not None:
            if "unet" in kwargs:
                raise ValueError("Pass either `unet` or `realign_unet`, not both.")
            hub_kwargs = {
                name: kwargs[name]
                for name in ("cache_dir", "force_download", "local_files_only", "token", "revision")
                if name in kwargs
            }
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if dtype is not None:
                hub_kwargs["dtype"] = dtype
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(
                realign_unet, subfolder=realign_unet_subfolder, use_safetensors=True, **hub_kwargs
            )
            logger.info(f"RealignDiff: using the caption-reward fine-tuned UNet from {realign_unet}.")
        elif "unet" not in kwargs:
            logger.warning(
                f"RealignDiff: no `realign_unet` given, so the coarse pass uses the base UNet of "
                f"{pretrained_model_name_or_path}."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self, save_directory: str | Path, *args: Any, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Save as a folder that plain diffusers loads as ``StableDiffusionPipeline``.

        ``model_index.json`` names ``StableDiffusionPipeline`` and this file is written beside it as
        ``pipeline.py``, so ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
        trust_remote_code=True)`` gives a ``RealignDiffPipeline``. To push, save then upload the
        folder (``huggingface_hub.upload_folder``); ``push_to_hub=True`` is refused because the
        parent would upload before the folder is complete.
        """
        if push_to_hub:
            raise ValueError(
                "`push_to_hub=True` is not supported: save the folder, then upload it with "
                "`huggingface_hub.upload_folder` (or `realign push`)."
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = StableDiffusionPipeline.__name__
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(__file__), Path(save_directory) / "pipeline.py")

    # -- helpers of __call__ -------------------------------------------------------------------

    def _labelled_progress_bar(self, total: int, label: str) -> tqdm:
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("desc", label)
        return tqdm(total=total, **config)

    def max_regions(self) -> int:
        """The most regions one image may have: the tokenizer's length less its start and end tokens
        (75 for CLIP), since each region owns at least one prompt token of its own."""
        return self.tokenizer.model_max_length - 2

    def _regions_per_prompt(self, regions: RegionsArgument, num_prompts: int) -> list[Sequence[Any]]:
        """Check the structure of the user's ``regions`` (no masks converted yet): one list of
        (caption, mask) pairs per prompt, at most ``max_regions()`` per prompt, no caption twice."""
        if not isinstance(regions, (list, tuple)):
            raise ValueError("`regions` must be a list of (caption, mask) pairs, or a list of such lists.")
        is_single = len(regions) == 0 or (
            isinstance(regions[0], (list, tuple)) and len(regions[0]) == 2 and isinstance(regions[0][0], str)
        )
        per_prompt = [regions] if is_single else list(regions)
        if len(per_prompt) != num_prompts:
            raise ValueError(
                f"`regions` holds layouts for {len(per_prompt)} prompt(s) but `prompt` has {num_prompts}; "
                "pass one list of (caption, mask) pairs per prompt."
            )
        for prompt_index, pairs in enumerate(per_prompt):
            if not isinstance(pairs, (list, tuple)):
                raise ValueError(f"`regions[{prompt_index}]` must be a list of (caption, mask) pairs.")
            if len(pairs) > self.max_regions():
                # Checked before any mask is converted: each region costs an image-sized plane.
                raise ValueError(
                    f"`regions[{prompt_index}]` has {len(pairs)} regions; at most {self.max_regions()} fit "
                    "(each region needs prompt tokens of its own)."
                )
            seen = set()
            for pair_index, pair in enumerate(pairs):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise ValueError(f"`regions[{prompt_index}][{pair_index}]` must be a (caption, mask) pair.")
                if pair[0] in seen:
                    # Two masks for one caption: which one the caption's tokens should follow is ambiguous.
                    raise ValueError(
                        f"`regions[{prompt_index}]`: the caption {pair[0]!r} is given twice; give each object "
                        "one region (merge its masks into one)."
                    )
                seen.add(pair[0])
        return per_prompt

    def _normalise_regions(
        self, regions: RegionsArgument | None, prompts: list[str], height: int, width: int
    ) -> list[list[tuple[str, torch.Tensor]]] | None:
        """Check the user's ``regions`` and return one list of (caption, bool mask) per prompt."""
        if regions is None:
            return None
        normalised = []
        for prompt_index, pairs in enumerate(self._regions_per_prompt(regions, len(prompts))):
            checked = []
            for pair_index, (caption, mask) in enumerate(pairs):
                argument = f"regions[{prompt_index}][{pair_index}] mask"
                checked.append((caption, mask_to_tensor(mask, height, width, argument=argument)))
            normalised.append(checked)
        return normalised

    def place_captions(self, prompt: str, texts: Sequence[str]) -> list[CaptionPlacement]:
        """Each caption's words placed in the prompt (``place_caption``); the prompt's words are read once."""
        prompt_words = words_with_token_positions(self.tokenizer, prompt)
        max_length = self.tokenizer.model_max_length
        return [place_caption(prompt_words, words_with_token_positions(self.tokenizer, t), max_length) for t in texts]

    def build_layout(
        self,
        prompt: str,
        captions: Sequence[str | LocalCaption],
        masks: Sequence[torch.Tensor | None],
        sources: Sequence[str],
        strict: bool,
        placements: Sequence[CaptionPlacement] | None = None,
    ) -> Layout:
        """Pair each caption's place in the prompt with its mask.

        ``placements`` are the captions' ``place_captions`` (computed here when not given: the coarse
        pass has them already). ``strict`` (user-given regions): a caption that cannot be placed, or
        that is given twice, raises ``ValueError``. Otherwise (captioner output) it is dropped with a
        warning. Empty masks are always dropped with a warning. Every drop is listed in the layout.
        More than ``max_regions()`` regions raise ``ValueError``.
        """
        max_length = self.tokenizer.model_max_length
        if placements is None:
            placements = self.place_captions(prompt, [c.text if isinstance(c, LocalCaption) else c for c in captions])
        layout = Layout(prompt=prompt, regions=[])
        seen: set[str] = set()
        for caption, mask, source, placement in zip(captions, masks, sources, placements):
            text = caption.text if isinstance(caption, LocalCaption) else caption
            box = caption.box if isinstance(caption, LocalCaption) else None
            if text in seen:
                if strict:
                    raise ValueError(f"`regions`: the caption {text!r} is given twice; give each object one region.")
                reason = "it repeats an earlier caption"
                warnings.warn(f"RealignDiff: dropping caption {text!r}: {reason}.", stacklevel=3)
                layout.dropped.append(DroppedRegion(text, reason))
                continue
            seen.add(text)
            reason = None
            if not placement.prompt_positions:
                if placement.truncated_words:
                    reason = (
                        f"its words {placement.truncated_words} fall past the tokenizer's {max_length}-token limit"
                    )
                elif placement.missing_words:
                    reason = f"its words {placement.missing_words} are not in the prompt {prompt!r}"
                else:
                    reason = "it has no words that describe an object"
            elif strict and placement.missing_words:
                reason = f"its words {placement.missing_words} are not in the prompt {prompt!r}"
            if reason is not None:
                if strict:
                    raise ValueError(f"`regions`: the caption {text!r} cannot be placed: {reason}.")
                warnings.warn(f"RealignDiff: dropping caption {text!r}: {reason}.", stacklevel=3)
                layout.dropped.append(DroppedRegion(text, reason))
                continue
            if mask is None or not bool(mask.any()):
                reason = "its mask is empty"
                warnings.warn(f"RealignDiff: dropping caption {text!r}: {reason}.", stacklevel=3)
                layout.dropped.append(DroppedRegion(text, reason))
                continue
            layout.regions.append(
                Region(
                    caption=text,
                    mask=mask,
                    token_indices=placement.prompt_positions,
                    source=source,
                    caption_token_indices=placement.caption_positions,
                    box=box,
                )
            )
        if len(layout.regions) > self.max_regions():
            raise ValueError(
                f"{'`regions`' if strict else 'the `captioner`'} gave {len(layout.regions)} regions for {prompt!r}; "
                f"at most {self.max_regions()} fit (each region needs prompt tokens of its own)."
            )
        return layout

    def _region_tensors(self, layouts: Sequence[Layout], height: int, width: int) -> RegionTensors | None:
        """Stack the layouts of the conditional batch into label maps and token masks."""
        num_regions = max((len(layout.regions) for layout in layouts), default=0)
        if num_regions == 0:
            return None
        num_tokens = self.tokenizer.model_max_length
        labels = torch.full((len(layouts), height, width), -1, dtype=torch.long)
        region_tokens = torch.zeros(len(layouts), num_regions, num_tokens, dtype=torch.bool)
        for index, layout in enumerate(layouts):
            if not layout.regions:
                continue
            labels[index] = partition_masks([region.mask for region in layout.regions])
            for region_index, region in enumerate(layout.regions):
                region_tokens[index, region_index, region.token_indices] = True
        return RegionTensors(labels=labels, region_tokens=region_tokens)

    def _swap_region_embeddings(
        self,
        prompt_embeds: torch.Tensor,
        layouts: Sequence[Layout],
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> torch.Tensor:
        """DenseDiffusion's embedding swap: each region's tokens take its caption's stand-alone encoding.

        Captions are encoded by ``encode_prompt`` exactly as the prompt was (``clip_skip``, LoRA scale,
        textual-inversion tokens), so the swapped rows come from the same layer as the rows they replace.
        """
        captions = sorted({region.caption for layout in layouts for region in layout.regions})
        if not captions:
            return prompt_embeds
        caption_embeds, _ = self.encode_prompt(
            captions, self._execution_device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip
        )
        by_caption = dict(zip(captions, caption_embeds.to(prompt_embeds.dtype)))
        swapped = prompt_embeds.clone()
        for index, layout in enumerate(layouts):
            for region in layout.regions:
                pairs = [
                    (p, c)
                    for p, c in zip(region.token_indices, region.caption_token_indices)
                    if c < len(by_caption[region.caption])
                ]
                if pairs:
                    prompt_positions, caption_positions = zip(*pairs)
                    swapped[index, list(prompt_positions)] = by_caption[region.caption][list(caption_positions)]
        return swapped

    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        num_inference_steps: int | None,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        extra_step_kwargs: dict[str, Any],
        timestep_cond: torch.Tensor | None,
        added_cond_kwargs: dict[str, Any] | None,
        cross_attention_kwargs: dict[str, Any] | None,
        state: AttentionModulationState,
        modulation_fraction: float,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        label: str,
        stop_fraction: float | None = None,
    ) -> torch.Tensor:
        """One denoising pass: the Stable Diffusion loop, with the attention state updated per step.

        The schedule is set afresh (``retrieve_timesteps``), which also resets multistep schedulers'
        history. The first ``modulation_fraction`` of its entries are re-weighted. With
        ``stop_fraction`` < 1 the pass ends after that fraction of the entries and returns the
        scheduler's prediction of the clean latents (``x0``) instead of the noisy latents: the
        early-stopped coarse pass. ``pipe._interrupt = True`` ends the pass with the latents so far.
        """
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, self._execution_device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)
        # Fractions of the schedule's entries, not of `num_inference_steps`: PNDM and second-order
        # schedulers have more entries than steps.
        modulated_steps = round(modulation_fraction * len(timesteps))
        stop_after_steps = None
        if stop_fraction is not None and stop_fraction < 1.0:
            stop_after_steps = max(1, round(stop_fraction * len(timesteps)))
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        attention_kwargs = {**(cross_attention_kwargs or {}), "realign_state": state}
        negative_prompt_embeds = prompt_embeds.chunk(2)[0] if self.do_classifier_free_guidance else None
        total = num_inference_steps if stop_after_steps is None else min(stop_after_steps, num_inference_steps)
        with self._labelled_progress_bar(total, label) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                # 0-d tensors, so a compiled UNet runs one graph for every step (see AttentionModulationState).
                state.timestep = torch.tensor(float(t))
                state.modulate = torch.tensor(i < modulated_steps)

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(
                            noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                        )
                step_output = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=True)
                if stop_after_steps is not None and i == stop_after_steps - 1:
                    progress_bar.update()
                    return self._predicted_clean_latents(step_output, latents, noise_pred, t)
                latents = step_output.prev_sample

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents

    def _predicted_clean_latents(
        self, step_output: Any, latents: torch.Tensor, noise_pred: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """The x0 prediction at a step: the scheduler's own when it gives one, else from ᾱ_t (DDPM Eq. 15)."""
        predicted = getattr(step_output, "pred_original_sample", None)
        if predicted is not None:
            return predicted
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if alphas_cumprod is None or getattr(self.scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError(
                f"{type(self.scheduler).__name__} gives no x0 prediction, so the coarse pass cannot stop early: "
                "pass `coarse_stop_fraction=1.0` or use a DDIM/DDPM-style scheduler."
            )
        alpha = alphas_cumprod.to(latents.device)[int(timestep)].to(latents.dtype)
        if prediction_type == "epsilon":
            return (latents - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()
        if prediction_type == "v_prediction":
            return alpha.sqrt() * latents - (1 - alpha).sqrt() * noise_pred
        return noise_pred

    def decode(
        self, latents: torch.Tensor, generator: Any, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[bool] | None]:
        """Decode latents to images in [-1, 1] and run the safety checker on them."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return self.run_safety_checker(image, self._execution_device, dtype)

    def _postprocess(self, image: torch.Tensor, has_nsfw_concept: list[bool] | None, output_type: str) -> Any:
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        callback_steps: int | None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        realign: bool = False,
        regions: RegionsArgument | None = None,
        captioner: DenseCaptioner | None = None,
        grounder: Grounder | None = None,
        num_images_per_prompt: int = 1,
        coarse_stop_fraction: float = 0.3,
        modulation_fraction: float = 0.3,
        cross_attention_weight: float = 1.0,
        self_attention_weight: float = 0.3,
        area_weight: float = 1.0,
        attention_implementation: str | AttentionFunction = "fast",
    ) -> None:
        """Every input check of a call, before any work: the parent's, then RealignDiff's.

        The parent's own ``__call__`` (``realign=False``) calls this with its positional arguments only;
        the keyword-only defaults then add nothing.
        """
        super().check_inputs(
            prompt=prompt,
            height=height,
            width=width,
            callback_steps=callback_steps,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        for name, value in (
            ("coarse_stop_fraction", coarse_stop_fraction),
            ("modulation_fraction", modulation_fraction),
            ("cross_attention_weight", cross_attention_weight),
            ("self_attention_weight", self_attention_weight),
            ("area_weight", area_weight),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value}.")
        if not 0.0 < coarse_stop_fraction <= 1.0:
            raise ValueError(
                f"`coarse_stop_fraction` must be in (0, 1] (a fraction of the steps), got {coarse_stop_fraction}."
            )
        if not 0.0 <= modulation_fraction <= 1.0:
            raise ValueError(
                f"`modulation_fraction` must be in [0, 1] (a fraction of the steps), got {modulation_fraction}."
            )
        for name, value in (
            ("cross_attention_weight", cross_attention_weight),
            ("self_attention_weight", self_attention_weight),
            ("area_weight", area_weight),
        ):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if not callable(attention_implementation) and attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"`attention_implementation` must be one of {sorted(ATTENTION_IMPLEMENTATIONS)} or a function with "
                f"`reweighted_attention_reference`'s signature, got {attention_implementation!r}."
            )
        if num_images_per_prompt is None or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        if not realign:
            for name, value in (("regions", regions), ("captioner", captioner), ("grounder", grounder)):
                if value is not None:
                    raise ValueError(f"`{name}` is used only with `realign=True`; remove it or set `realign=True`.")
            return
        if prompt is None:
            raise ValueError(
                "`realign=True` needs the `prompt` text: the re-weighting places each region's caption in the "
                "prompt's tokens, which `prompt_embeds` do not name. Pass `prompt`, or use `realign=False`."
            )
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise ValueError(
                "`ip_adapter_image`/`ip_adapter_image_embeds` need IP-Adapter's attention processors, which the "
                "re-weighting would replace; use `realign=False` for IP-Adapter."
            )
        num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != num_prompts:
            raise ValueError(
                f"`negative_prompt_embeds` holds {negative_prompt_embeds.shape[0]} rows but `prompt` has "
                f"{num_prompts} prompt(s); pass one row per prompt."
            )
        if regions is not None:
            self._regions_per_prompt(regions, num_prompts)
        # Above 1, λ = w·c(t)·ρ exceeds 1 at early steps and (1 − λ) turns negative: the formula then
        # inverts the order of the scores outside the region's keys. DenseDiffusion users do go above 1.
        for name, value in (
            ("cross_attention_weight", cross_attention_weight),
            ("self_attention_weight", self_attention_weight),
        ):
            if value > 1.0:
                warnings.warn(
                    f"RealignDiff: `{name}`={value} > 1: at early steps λ exceeds 1 and the re-weighting inverts "
                    "the order of the attention scores it modulates (see the `__call__` docstring).",
                    UserWarning,
                    stacklevel=3,
                )

    # -- the call --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's signature)
        realign: bool = True,
        regions: RegionsArgument | None = None,
        captioner: DenseCaptioner | None = None,
        grounder: Grounder | None = None,
        coarse_stop_fraction: float = 0.3,
        modulation_fraction: float = 0.3,
        cross_attention_weight: float = 1.0,
        self_attention_weight: float = 0.3,
        area_weight: float = 1.0,
        swap_region_embeddings: bool = True,
        attention_implementation: str | AttentionFunction = "fast",
    ) -> RealignDiffPipelineOutput | tuple:
        r"""Generate images with RealignDiff's two passes.

        The arguments up to ``callback_on_step_end_tensor_inputs`` are ``StableDiffusionPipeline``'s,
        with the same meaning, except:

        - ``callback_on_step_end`` runs in the fine pass only (the pass whose latents are returned),
          with the parent's step indices ``0 .. len(timesteps) - 1``; the coarse pass runs untouched.
          Setting ``pipe._interrupt = True`` in it ends the fine pass and returns what it denoised so far.
        - with ``realign=True``, ``prompt`` is required (``prompt_embeds`` cannot say where a region's
          words are) and IP-Adapter inputs are refused (its processors would be replaced); use
          ``realign=False`` for either. ``negative_prompt_embeds`` work in both modes.

        The first ``realign=True`` call leaves ``RealignAttnProcessor`` installed on the UNet (plain
        attention when no re-weighting is asked, so plain calls give the same result); it never swaps
        processors back, so concurrent calls and pipelines sharing the UNet keep their re-weighting.
        Processors that do more than plain attention (IP-Adapter, custom ones) are refused;
        attention slicing is replaced (with a warning).

        Args:
            realign (`bool`, defaults to `True`): `False` is exactly `StableDiffusionPipeline.__call__`
                (same processors, same output), wrapped in a `RealignDiffPipelineOutput`.
            regions (`list`, *optional*): the layout, skipping the coarse pass: `[(caption, mask), ...]`
                for one prompt, or one such list per prompt. Masks are PIL, numpy or torch, any size;
                soft masks are cut at 0.5, 8-bit masks are 0-255 unless their maximum is 1. A prompt's
                regions are shared by its images. At most `max_regions()` (75 for CLIP) per prompt, each
                caption once.
            captioner (`DenseCaptioner`, *optional*): local captions from the coarse image; defaults
                to `self.captioner`, then to `PromptPhraseCaptioner()`. It must return a list of `str` or
                `LocalCaption`; a caption it repeats is dropped with a warning.
            grounder (`Grounder`, *optional*): a mask per caption from the coarse image; defaults to
                `self.grounder`, then to masks from the coarse pass's cross-attention maps (which
                also fill in any caption the grounder returns `None` for).
            coarse_stop_fraction (`float`, defaults to 0.3): the coarse pass stops after this fraction
                of the steps; its image is the decoded x0 prediction at that step and the attention
                masks average the steps run so far. `1.0` runs the full coarse pass, as the paper does.
            modulation_fraction (`float`, defaults to 0.3): the fraction of steps, from the first,
                whose attention is re-weighted (DenseDiffusion: 0.3).
            cross_attention_weight (`float`, defaults to 1.0), self_attention_weight (`float`,
                defaults to 0.3), area_weight (`float`, defaults to 1.0): the re-weighting strengths
                `w` and the area penalty `w_area` (DenseDiffusion's defaults). They must be finite and
                >= 0. Cross and self weights above 1 are allowed with a `UserWarning`: λ = w·(t/T)^5·ρ then
                exceeds 1 at early steps and (1 − λ) < 0 inverts the order of the modulated scores.
            swap_region_embeddings (`bool`, defaults to `True`): replace each region's tokens in the
                prompt embedding by its caption's own encoding (DenseDiffusion), encoded as the prompt
                is (`clip_skip` included).
            attention_implementation (`str` or callable, defaults to `"fast"`): `"fast"` (one fused SDPA call,
                no N×N matrix) or `"reference"` (DenseDiffusion's materialised scores); same result. Or a
                function with `reweighted_attention_reference`'s signature, to try another modulation.

        Returns:
            `RealignDiffPipelineOutput` (or a tuple `(images, nsfw_content_detected, coarse_images,
            layouts)` when `return_dict=False`; `(images, nsfw_content_detected)` with `realign=False`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's.
        if not height or not width:
            sample_size = self.unet.config.sample_size
            sample_height, sample_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            height, width = sample_height * self.vae_scale_factor, sample_width * self.vae_scale_factor

        # 1. Check every input before any expensive work.
        self.check_inputs(
            prompt=prompt,
            height=height,
            width=width,
            callback_steps=None,  # the parent's deprecated argument; this call has no `callback_steps`
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            realign=realign,
            regions=regions,
            captioner=captioner,
            grounder=grounder,
            num_images_per_prompt=num_images_per_prompt,
            coarse_stop_fraction=coarse_stop_fraction,
            modulation_fraction=modulation_fraction,
            cross_attention_weight=cross_attention_weight,
            self_attention_weight=self_attention_weight,
            area_weight=area_weight,
            attention_implementation=attention_implementation,
        )
        if not realign:
            # Exactly the parent's call: its loop, its processors, its output.
            output = StableDiffusionPipeline.__call__(
                self,
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
            if not return_dict:
                return output
            return RealignDiffPipelineOutput(
                images=output.images,
                nsfw_content_detected=output.nsfw_content_detected,
                coarse_images=None,
                layouts=None,
            )

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        user_regions = self._normalise_regions(regions, prompts, height, width)
        user_layouts = None
        if user_regions is not None:
            user_layouts = [
                self.build_layout(p, [c for c, _ in pairs], [m for _, m in pairs], ["user"] * len(pairs), strict=True)
                for p, pairs in zip(prompts, user_regions)
            ]
        install_realign_processors(self.unet)

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")

        # 2. Encode the prompt once; both passes use these encodings.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 3. The initial latents, shared by both passes.
        batch_size = len(prompts) * num_images_per_prompt
        initial_latents = self.prepare_latents(
            batch_size,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        latent_size = (initial_latents.shape[-2], initial_latents.shape[-1])
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=initial_latents.dtype)
        pass_kwargs = dict(
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            extra_step_kwargs=extra_step_kwargs,
            timestep_cond=timestep_cond,
            added_cond_kwargs=None,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        # 4. Coarse pass: plain attention, recording cross-attention maps for the attention grounder.
        coarse_output = None
        if user_layouts is None:
            recorder = CrossAttentionRecorder()
            coarse_state = AttentionModulationState(
                latent_size=latent_size,
                recorder=recorder,
                conditional_half_only=self.do_classifier_free_guidance,
                num_train_timesteps=num_train_timesteps,
            )
            coarse_latents = self.denoise(
                initial_latents.clone(),
                prompt_embeds,
                state=coarse_state,
                modulation_fraction=0.0,
                callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=[],
                label="RealignDiff coarse pass",
                stop_fraction=coarse_stop_fraction,
                **pass_kwargs,
            )
            if self.interrupt:
                # Interrupted during the coarse pass: no layout, so what was denoised so far is the result.
                return self._finish(
                    coarse_latents, generator, prompt_embeds.dtype, output_type, return_dict, None, None
                )
            coarse_decoded, coarse_nsfw = self.decode(coarse_latents, generator, prompt_embeds.dtype)
            coarse_output = self._postprocess(coarse_decoded, coarse_nsfw, output_type)
            coarse_images = self._postprocess(coarse_decoded, coarse_nsfw, "pil")
            layouts = self._layouts_from_coarse_pass(
                prompts, num_images_per_prompt, coarse_images, recorder, captioner, grounder, height, width
            )
        else:
            layouts = [layout for layout in user_layouts for _ in range(num_images_per_prompt)]

        # 5. Fine pass: same initial latents, re-weighted attention in the first steps.
        fine_embeds = prompt_embeds
        if swap_region_embeddings:
            conditional = prompt_embeds.chunk(2)[1] if self.do_classifier_free_guidance else prompt_embeds
            conditional = self._swap_region_embeddings(
                conditional, layouts, clip_skip=self.clip_skip, lora_scale=lora_scale
            )
            fine_embeds = (
                torch.cat([prompt_embeds.chunk(2)[0], conditional])
                if self.do_classifier_free_guidance
                else conditional
            )
        fine_state = AttentionModulationState(
            latent_size=latent_size,
            regions=self._region_tensors(layouts, height, width),
            cross_attention_weight=cross_attention_weight,
            self_attention_weight=self_attention_weight,
            area_weight=area_weight,
            conditional_half_only=self.do_classifier_free_guidance,
            num_train_timesteps=num_train_timesteps,
            attention_function=attention_implementation
            if callable(attention_implementation)
            else ATTENTION_IMPLEMENTATIONS[attention_implementation],
        )
        fine_latents = self.denoise(
            initial_latents.clone(),
            fine_embeds,
            state=fine_state,
            modulation_fraction=modulation_fraction,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            label="RealignDiff fine pass",
            **pass_kwargs,
        )

        # 6. Decode and return.
        return self._finish(
            fine_latents, generator, prompt_embeds.dtype, output_type, return_dict, coarse_output, layouts
        )

    def _finish(
        self,
        latents: torch.Tensor,
        generator: Any,
        dtype: torch.dtype,
        output_type: str,
        return_dict: bool,
        coarse_output: Any,
        layouts: list[Layout] | None,
    ) -> RealignDiffPipelineOutput | tuple:
        """Decode the returned latents, free offloaded models and build the output."""
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
        else:
            decoded, has_nsfw_concept = self.decode(latents, generator, dtype)
            image = self._postprocess(decoded, has_nsfw_concept, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept, coarse_output, layouts)
        return RealignDiffPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, coarse_images=coarse_output, layouts=layouts
        )

    def _checked_captions(self, captions: Any) -> list[str | LocalCaption]:
        """The captioner's output as a list, or a ``TypeError`` naming the captioner and what it must return."""
        expected = "a list of str or LocalCaption"
        if isinstance(captions, (str, LocalCaption)) or not isinstance(captions, (list, tuple)):
            raise TypeError(f"the `captioner` must return {expected}, got {type(captions).__name__}.")
        for index, caption in enumerate(captions):
            if not isinstance(caption, (str, LocalCaption)):
                raise TypeError(f"the `captioner` must return {expected}; item {index} is {type(caption).__name__}.")
        texts = {c.text if isinstance(c, LocalCaption) else c for c in captions}
        if len(texts) > self.max_regions():
            raise ValueError(
                f"the `captioner` returned {len(texts)} distinct captions; at most {self.max_regions()} fit "
                "(each region needs prompt tokens of its own)."
            )
        return list(captions)

    @staticmethod
    def _checked_grounded(grounded: Any, num_captions: int) -> list[MaskLike | None]:
        """The grounder's output as a list, or a ``TypeError`` naming the grounder and what it must return."""
        expected = f"a list of {num_captions} masks (PIL image, numpy array or torch tensor) or None, one per caption"
        if not isinstance(grounded, (list, tuple)):
            raise TypeError(f"the `grounder` must return {expected}; got {type(grounded).__name__}.")
        if len(grounded) != num_captions:
            raise ValueError(f"the `grounder` returned {len(grounded)} masks for {num_captions} captions.")
        for index, mask in enumerate(grounded):
            if mask is not None and not isinstance(mask, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise TypeError(f"the `grounder` must return {expected}; item {index} is {type(mask).__name__}.")
        return list(grounded)

    def _layouts_from_coarse_pass(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        coarse_images: list[PIL.Image.Image],
        recorder: CrossAttentionRecorder,
        captioner: DenseCaptioner | None,
        grounder: Grounder | None,
        height: int,
        width: int,
    ) -> list[Layout]:
        """Local captions and masks for every coarse image (the fine stage's preprocessing)."""
        captioner = captioner or self.captioner or PromptPhraseCaptioner()
        grounder = grounder or self.grounder
        maps_by_grid = recorder.mean_maps()
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        attention_maps = maps_by_grid[attention_map_grid(list(maps_by_grid), latent_size)]

        layouts = []
        for index, image in enumerate(coarse_images):
            prompt = prompts[index // num_images_per_prompt]
            captions = self._checked_captions(captioner(image, prompt))
            texts = [c.text if isinstance(c, LocalCaption) else c for c in captions]
            placements = self.place_captions(prompt, texts)  # once: build_layout reads them too
            token_groups = [placement.prompt_positions for placement in placements]
            placeable = [i for i, tokens in enumerate(token_groups) if tokens]
            attention_masks: list[torch.Tensor | None] = [None] * len(texts)
            for i, mask in zip(
                placeable, masks_from_attention_maps(attention_maps[index], [token_groups[i] for i in placeable])
            ):
                attention_masks[i] = mask_to_tensor(mask, height, width)
            masks: list[torch.Tensor | None] = list(attention_masks)
            sources = ["attention"] * len(texts)
            if grounder is not None and texts:
                grounded = self._checked_grounded(grounder(image, texts), len(texts))
                for i, mask in enumerate(grounded):
                    if mask is not None:
                        masks[i] = mask_to_tensor(mask, height, width, argument="grounder mask")
                        sources[i] = getattr(grounder, "name", type(grounder).__name__)
            layouts.append(self.build_layout(prompt, captions, masks, sources, strict=False, placements=placements))
        return layouts
