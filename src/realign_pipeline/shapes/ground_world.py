"""Ground the shapes world: make its object words, not its padding, carry the objects.

    realign world ground --output outputs/shapes-world-grounded --set steps=1500      (options: GroundingConfig)

Why. Stable Diffusion's word tokens attend where their objects are drawn (Prompt-to-Prompt, DAAM),
which is what DenseDiffusion's and RealignDiff's re-weighting relies on. The first shapes world read
its prompt from the padding: CLIP's text encoder is causal, so every position after the last word
(``<|endoftext|>`` and the padding, which repeats it) sees the whole prompt, and a small UNet
trained from scratch found it easiest to attend there (95% of its 16×16 cross-attention). Boosting a
region's words then changes nothing.

How. The world's UNet and text encoder are fine-tuned (or, with ``from_scratch``, trained from a fresh
initialisation of the same architecture) on rendered scenes, whose true object masks the renderer gives for
free, with three terms beside the ordinary denoising loss:

1. **Blank padding.** Positions from ``<|endoftext|>`` on are replaced, in what the UNet sees, by
   the empty prompt's encodings, and the text encoder is pulled to produce exactly those there
   (an MSE term), so at inference, through a plain ``StableDiffusionPipeline``, the padding says
   nothing about the prompt and the words must carry it. With ``blank_padding`` false the UNet sees the
   text encoder's own padding, except in a ``padding_dropout`` share of the scenes, blanked as above (a
   dropout of the padding, our addition): the world keeps reading its padding, and its words learn to carry
   the objects alone, which they must where the re-weighting pushes a region's attention off the padding.
2. **TokenCompose's token loss** (Wang et al., arXiv 2312.03626, Eq. 3): for each object group and
   every cross-attention resolution, ``(1 − Σ_{i∈mask} A_i / Σ_i A_i)²`` with ``A_i`` the attention of
   pixel ``i`` on the group's words (colour and shape): the words' attention lands inside the object.
3. **TokenCompose's pixel loss** (Eq. 4): a binary cross-entropy between ``A_i`` and the mask, which
   also takes attention mass off the padding at object pixels (the term that moved most in a
   first try, see issue [F]).

4. **Optionally, re-weighting during training** (``modulated_fraction``): a share of the batches is denoised
   with DenseDiffusion's re-weighting switched on over the true masks, at the timesteps where inference
   modulates (from step ``modulated_from_step`` on, if set). Stable Diffusion follows boosted word attention
   without such training; a world this small does not, and this term teaches it to. With it, the world is a
   test bed for the *implementation* of the fine stage (the right tokens, pixels, steps and halves move
   objects; wrong ones do not), not evidence that the re-weighting works training-free. Its
   model card says which terms made it.

The built-in world's ``unet/`` and ``text_encoder/`` were made this way, with terms 2-4 and the padding kept (its
model card has the command). The result stays an ordinary diffusers ``StableDiffusionPipeline`` folder (same
architecture, tokenizer, VAE and captioner as the world it starts from; ``prompt_length`` may pad prompts shorter),
with a model card that says how it was made. One resumable, seeded command: the state is checkpointed as
safetensors (weights, optimizer moments, EMA, RNG) every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import UsageError
from ..options import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Limit, check_fields
from ..pipeline_realign_diff import (
    AttentionModulationState,
    CrossAttentionRecorder,
    RealignAttnProcessor,
    RegionTensors,
    words_with_token_positions,
)
from .data import IMAGE_SIZE, Sample, make_sample, parse_prompt, phrase_for
from .train_world import (
    checkpoint_path,
    ema_update,
    lr_at,
    resume_stage,
    save_stage,
    set_lr,
    weight_file_lines,
    world_card_data,
)

WORLD = Path(__file__).with_name("world")
MAX_GROUPS = 3  # scenes name at most three object groups


# What each numeric GroundingConfig option may be (``options.Limit``), checked on construction.
GROUNDING_LIMITS: dict[str, Limit] = {
    "num_threads": AT_LEAST_ONE,
    "num_images": AT_LEAST_ONE,
    "steps": AT_LEAST_ONE,
    "stop_after_steps": NON_NEGATIVE,
    "batch_size": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "warmup_steps": NON_NEGATIVE,
    "min_lr_ratio": FRACTION,
    "ema_decay": FRACTION,
    "caption_dropout": FRACTION,
    "snr_gamma": POSITIVE,
    "token_loss_weight": NON_NEGATIVE,
    "pixel_loss_weight": NON_NEGATIVE,
    "padding_loss_weight": NON_NEGATIVE,
    "prompt_length": NON_NEGATIVE,
    "padding_dropout": FRACTION,
    "modulated_fraction": FRACTION,
    "modulated_from_step": NON_NEGATIVE,
    "modulation_min_timestep": Limit(0, 999),
    "modulated_cross_attention_weight": NON_NEGATIVE,
    "modulated_self_attention_weight": NON_NEGATIVE,
    "modulated_x0_weight_cap": Limit(1.0, None),
    "loose_region_fraction": FRACTION,
    "checkpoint_every": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
}


@dataclass
class GroundingConfig:
    """Everything that decides the grounded world."""

    # The built-in world has itself been grounded by this module (its model card gives the options); to reproduce
    # it, start from what ``realign world train`` makes.
    world: str = str(WORLD)
    output_dir: str = "outputs/shapes-world-grounded"
    work_dir: str | None = None  # checkpoints and caches; default "<output_dir>-work"
    seed: int = 0
    num_threads: int = 1
    num_images: int = 8000
    steps: int = 2500
    # Stop (checkpoint and export the EMA weights) after this many steps while keeping the learning-rate schedule of
    # ``steps``: a part-way look at a long run. Running again with a larger value, or 0 (run to ``steps``), continues.
    stop_after_steps: int = 0
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    # Against a denoising loss near 0.01: TokenCompose's own 1e-3 / 5e-5 barely move a model this small.
    token_loss_weight: float = 0.3
    pixel_loss_weight: float = 0.05
    padding_loss_weight: float = 1.0
    # Term 1 itself. False keeps the prompt in the padding (as the world before grounding reads it) and trains only the
    # grounding terms and the modulated batches: a world that keeps its drawing and learns to follow regions.
    blank_padding: bool = True
    # With the padding kept: the share of scenes whose UNet input has the padding blanked all the same, so that the
    # words alone must carry those scenes' objects. Re-weighting pushes a region's pixels off the padding, onto its
    # words; a world whose words carry nothing without the padding loses objects there.
    padding_dropout: float = 0.0
    # Pad prompts to this many tokens instead of the tokenizer's 77 (0: keep it); the exported tokenizer keeps it
    # as its ``model_max_length``. Shapes prompts take at most 13, so at 77 some 65 padding keys compete with the
    # words for each pixel's attention and take most of it (``realign world probe``'s ``object_attention_split``).
    prompt_length: int = 0
    # Train the UNet and text encoder from a fresh (seeded) initialisation of the world's architecture, with the
    # grounding terms from the first step, instead of fine-tuning the world's weights: a model that never learnt
    # to read its prompt from the padding. Tokenizer, VAE, scheduler and captioner stay the world's.
    from_scratch: bool = False
    # Share of batches trained with the re-weighting switched on over the true masks (at the weights below), all
    # at one timestep in [modulation_min_timestep, T): the steps a 30% window of a 25-step DDIM run modulates.
    # The model then learns to follow its boosted word attention (see the module doc).
    modulated_fraction: float = 0.0
    # No re-weighted batch before this step: the world first learns to ground (and keep drawing) with the plain
    # batches, then learns to follow regions. 0: from the first step.
    modulated_from_step: int = 0
    modulation_min_timestep: int = 600
    # The re-weighting's strengths in those batches (the pipeline's ``cross_attention_weight`` and
    # ``self_attention_weight``). DenseDiffusion's defaults; a world that will be run at other weights can be
    # trained at them.
    modulated_cross_attention_weight: float = 1.0
    modulated_self_attention_weight: float = 0.3
    # Share of a modulated batch's scenes whose regions are loose (strips or grown boxes around each group, as a
    # user draws them) instead of the true masks: layouts at inference are halves and boxes, not silhouettes.
    loose_region_fraction: float = 0.0
    # Modulated batches teach where objects go, which the ε-loss barely sees at the timesteps inference modulates
    # (see ``modulated_loss_weights``). 1.0 weighs them as any other batch.
    modulated_x0_weight_cap: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 25

    def __post_init__(self) -> None:
        check_fields(self, GROUNDING_LIMITS)
        if self.modulated_from_step > 0 and (self.modulated_fraction == 0 or self.modulated_from_step >= self.steps):
            raise UsageError(
                f"modulated_from_step {self.modulated_from_step}: needs re-weighted batches (modulated_fraction above "
                f"0, got {self.modulated_fraction}) and a step before the run's last ({self.steps})"
            )
        if self.blank_padding and self.padding_dropout > 0:
            raise UsageError(
                f"padding_dropout {self.padding_dropout}: blanks the padding of some scenes when it is kept, so it "
                "needs blank_padding false (blank_padding true already blanks every scene's)"
            )

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(self.output_dir).rstrip("/") + "-work")


# ---------------------------------------------------------------------------------------------
# data: latents, token ids, per-group word positions and masks at every attention resolution


def phrase_token_positions(tokenizer: CLIPTokenizer, prompt: str) -> list[list[int]]:
    """Token positions of the colour and shape word of each object group of a shapes-world prompt.

    Groups are the prompt's, in order; a group's words are found as its phrase ("two red circles") in the
    prompt's words, first unused occurrence first. The count word is left out, as the pipeline leaves it out
    of a region's tokens (it is not a content word).
    """
    words = words_with_token_positions(tokenizer, prompt)
    texts = [word.text for word in words]
    used: set[int] = set()
    positions = []
    for group in parse_prompt(prompt).groups:
        phrase = phrase_for(group).split()
        start = next(
            s for s in range(len(texts) - len(phrase) + 1) if texts[s : s + len(phrase)] == phrase and s not in used
        )
        used.add(start)
        positions.append([p for word in words[start + 1 : start + len(phrase)] for p in word.token_positions])
    return positions


def group_masks(sample: Sample, grids: list[int]) -> dict[int, torch.Tensor]:
    """Each group's mask (union of its objects) area-resized to every grid: ``{g: (MAX_GROUPS, g, g)}``."""
    full = torch.zeros(MAX_GROUPS, IMAGE_SIZE, IMAGE_SIZE)
    for obj, mask in zip(sample.scene.objects, sample.masks):
        full[obj.group] = torch.maximum(full[obj.group], torch.from_numpy(mask).float())
    return {grid: F.interpolate(full[None], size=(grid, grid), mode="area")[0] for grid in grids}


@dataclass
class GroundingData:
    latents: torch.Tensor  # (N, 4, 16, 16), scaled
    ids: torch.Tensor  # (N, 77)
    word_tokens: torch.Tensor  # (N, MAX_GROUPS, 77) bool: each group's words
    masks: dict[int, torch.Tensor]  # grid -> (N, MAX_GROUPS, grid, grid) soft masks


@torch.no_grad()
def build_data(
    config: GroundingConfig, tokenizer: CLIPTokenizer, vae: AutoencoderKL, grids: list[int]
) -> GroundingData:
    """Render ``num_images`` training scenes (held-out pairings excluded) and encode them once."""
    length = tokenizer.model_max_length
    cache = config.work / f"data-n{config.num_images}-s{config.seed}-t{length}.safetensors"
    if cache.exists():
        tensors = load_file(cache)
        masks = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("masks.")}
        return GroundingData(tensors["latents"], tensors["ids"], tensors["word_tokens"], masks)
    word_tokens = torch.zeros(config.num_images, MAX_GROUPS, length, dtype=torch.bool)
    masks = {grid: torch.zeros(config.num_images, MAX_GROUPS, grid, grid) for grid in grids}
    captions, latents = [], []
    pixels = []
    for index in tqdm(range(config.num_images), desc="render", mininterval=5.0):
        sample = make_sample(config.seed + 100, index, "train")
        tokens = len(tokenizer(sample.scene.caption).input_ids)
        if tokens > length:
            raise UsageError(
                f"prompt_length {length}: the training caption {sample.scene.caption!r} takes {tokens} tokens"
            )
        captions.append(sample.scene.caption)
        for group, positions in enumerate(phrase_token_positions(tokenizer, sample.scene.caption)):
            word_tokens[index, group, positions] = True
        for grid, resized in group_masks(sample, grids).items():
            masks[grid][index] = resized
        pixels.append(np.asarray(sample.image))
        if len(pixels) == 256 or index == config.num_images - 1:
            batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            latents.append(vae.encode(batch).latent_dist.mean * vae.config.scaling_factor)
            pixels = []
    ids = tokenizer(captions, padding="max_length", max_length=length, return_tensors="pt").input_ids
    data = GroundingData(torch.cat(latents), ids, word_tokens, masks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": data.latents.contiguous(), "ids": data.ids, "word_tokens": data.word_tokens}
    tensors.update({f"masks.{grid}": value for grid, value in data.masks.items()})
    save_file(tensors, str(cache))
    return data


# ---------------------------------------------------------------------------------------------
# the losses (pure functions)


def padding_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B, L)`` bool: positions from the first ``<|endoftext|>`` on (the end token and the padding)."""
    is_eos = ids == eos_token_id
    return is_eos.cumsum(dim=1) > 0


def is_modulated_step(config: GroundingConfig, step: int, generator: torch.Generator) -> bool:
    """Whether batch ``step`` (0-based) is trained with the re-weighting on: from ``modulated_from_step`` on, with
    probability ``modulated_fraction``. Drawn only when it can be on, so runs without re-weighted batches keep the
    random stream they had before."""
    if config.modulated_fraction == 0 or step < config.modulated_from_step:
        return False
    return bool(torch.rand((), generator=generator) < config.modulated_fraction)


def rows_to_blank(config: GroundingConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``(B,)`` bool: the scenes whose padding the UNet sees blanked. Every one with ``blank_padding``; else each with
    probability ``padding_dropout``, drawn from ``generator`` only when that is above 0."""
    if config.padding_dropout > 0:
        return torch.rand(batch_size, generator=generator) < config.padding_dropout
    return torch.full((batch_size,), config.blank_padding)


def blank_padding_rows(
    encoded: torch.Tensor, empty: torch.Tensor, padding: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """What the UNet sees: ``encoded`` ``(B, L, D)``, with the empty prompt's encodings ``empty`` ``(1, L, D)`` at
    the ``padding`` positions ``(B, L)`` of the ``rows`` ``(B,)`` chosen (term 1 blanks every row)."""
    return torch.where((padding & rows[:, None])[..., None], empty.expand_as(encoded), encoded)


def attention_on_group_words(attention: torch.Tensor, word_tokens: torch.Tensor) -> torch.Tensor:
    """``A_i``: each pixel's attention on each group's words, ``(B, G, N)`` from ``(B, N, L)`` and ``(B, G, L)``."""
    return torch.einsum("bnl,bgl->bgn", attention, word_tokens.to(attention.dtype))


def token_grounding_loss(
    attention: torch.Tensor, word_tokens: torch.Tensor, masks: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """TokenCompose's token loss (arXiv 2312.03626, Eq. 3) at one resolution.

    ``attention`` ``(B, N, L)`` (probabilities over the L text tokens, heads averaged), ``word_tokens``
    ``(B, G, L)`` bool, ``masks`` ``(B, G, N)`` in [0, 1], ``present`` ``(B, G)`` bool. Per group:
    ``(1 − Σ_i m_i A_i / Σ_i A_i)²`` with ``A_i = Σ_{j∈group} attention_ij``; mean over present groups.
    """
    group_attention = attention_on_group_words(attention, word_tokens)
    inside = (group_attention * masks).sum(-1) / group_attention.sum(-1).clamp(min=1e-8)
    per_group = (1.0 - inside) ** 2
    return (per_group * present).sum() / present.sum().clamp(min=1)


def pixel_grounding_loss(
    attention: torch.Tensor, word_tokens: torch.Tensor, masks: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """TokenCompose's pixel loss (Eq. 4) at one resolution: BCE between ``A_i`` and the group's mask.

    Same arguments as ``token_grounding_loss``. Pushes ``A_i`` up inside the object (mass off the padding
    and off other objects' words) and down outside it.
    """
    group_attention = attention_on_group_words(attention, word_tokens)
    bce = F.binary_cross_entropy(group_attention.clamp(1e-6, 1 - 1e-6), masks, reduction="none").mean(-1)
    return (bce * present).sum() / present.sum().clamp(min=1)


def modulated_loss_weights(snr: torch.Tensor, snr_gamma: float, x0_weight_cap: float) -> torch.Tensor:
    """Per-timestep weights of a modulated batch's ε-loss: ``max(min(SNR, γ)/SNR, min(1/SNR, cap))``.

    ``min(SNR, γ)/SNR`` is Min-SNR-γ (Hang et al., arXiv 2303.09556, Eq. 7, ε form), the weight of every
    other batch. An error in the predicted clean latent shows up in ε scaled by √SNR, so at SNR ≪ 1 (the
    early steps inference modulates, where the layout is chosen) where an object goes hardly moves the
    ε-loss; ``1/SNR`` is the weight that turns the ε-loss into the x0-loss there, capped. With ``cap = 1``
    (and ``γ ≥ 1``) this is Min-SNR-γ unchanged.
    """
    min_snr = torch.clamp(snr, max=snr_gamma) / snr
    return torch.maximum(min_snr, torch.clamp(1.0 / snr, max=x0_weight_cap))


def true_mask_regions(data: GroundingData, index: torch.Tensor, dropped: torch.Tensor, side: int) -> RegionTensors:
    """The batch's true layouts as the processor's regions: each latent cell to the group covering most of it
    (none where no group covers half of it), each group owning its words; no regions for dropped captions."""
    masks = data.masks[side][index]
    covered, labels = masks.max(dim=1)
    labels = torch.where((covered >= 0.5) & ~dropped[:, None, None], labels, -1)
    return RegionTensors(labels=labels, region_tokens=data.word_tokens[index] & ~dropped[:, None, None])


def group_boxes(masks: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Each group's bounding box ``(top, left, bottom, right)`` (inclusive) on a ``(G, h, w)`` soft mask grid:
    the cells it covers at least half, or any it touches if none; ``None`` for a group that is absent."""
    boxes = []
    for mask in masks:
        cells = mask >= 0.5 if bool((mask >= 0.5).any()) else mask > 0
        if not bool(cells.any()):
            boxes.append(None)
            continue
        rows, cols = cells.any(dim=1).nonzero()[:, 0], cells.any(dim=0).nonzero()[:, 0]
        boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])))
    return boxes


def strip_labels(
    boxes: list[tuple[int, int, int, int] | None], side: int, axis: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Cut the grid into one strip per group along ``axis`` (0: rows, top to bottom; 1: columns), each strip
    holding its group's box, the cuts drawn uniformly between neighbouring boxes; ``None`` where the boxes
    overlap along that axis (no such cut exists). Absent groups get no strip."""
    present = [(group, box) for group, box in enumerate(boxes) if box is not None]
    present.sort(key=lambda item: item[1][axis] + item[1][axis + 2])
    for (_, before), (_, after) in zip(present[:-1], present[1:]):
        if before[axis + 2] >= after[axis]:
            return None
    labels = torch.full((side, side), -1, dtype=torch.long)
    start = 0
    for position, (group, box) in enumerate(present):
        if position + 1 < len(present):
            low, high = box[axis + 2] + 1, present[position + 1][1][axis]
            stop = int(torch.randint(low, high + 1, (1,), generator=generator))
        else:
            stop = side
        if axis == 0:
            labels[start:stop, :] = group
        else:
            labels[:, start:stop] = group
        start = stop
    return labels


def grown_box_labels(
    masks: torch.Tensor, boxes: list[tuple[int, int, int, int] | None], generator: torch.Generator, grow: int = 3
) -> torch.Tensor:
    """Each group's box grown by 0..``grow`` cells on every side; a cell two grown boxes claim goes to neither,
    and a group's own object cells (true mask ≥ 0.5) are always its own."""
    side = masks.shape[-1]
    claims = torch.zeros(len(boxes), side, side, dtype=torch.bool)
    for group, box in enumerate(boxes):
        if box is None:
            continue
        margins = torch.randint(0, grow + 1, (4,), generator=generator).tolist()
        top, left = max(box[0] - margins[0], 0), max(box[1] - margins[1], 0)
        bottom, right = min(box[2] + margins[2], side - 1), min(box[3] + margins[3], side - 1)
        claims[group, top : bottom + 1, left : right + 1] = True
    labels = torch.where(claims.sum(0) == 1, claims.to(torch.long).argmax(0), -1)
    for group in range(len(boxes)):
        labels = torch.where(masks[group] >= 0.5, group, labels)
    return labels


def loose_region_labels(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A user-style layout for one scene from its ``(G, h, w)`` true masks: strips along a random axis (halves,
    thirds) when the groups' boxes can be cut apart that way, else grown boxes; every object stays inside its
    own group's region, so the rendered scene is one the layout asks for."""
    boxes = group_boxes(masks)
    if bool(torch.rand((), generator=generator) < 0.5):
        first_axis = int(torch.randint(0, 2, (1,), generator=generator))
        for axis in (first_axis, 1 - first_axis):
            labels = strip_labels(boxes, masks.shape[-1], axis, generator)
            if labels is not None:
                return labels
    return grown_box_labels(masks, boxes, generator)


# ---------------------------------------------------------------------------------------------
# training


def training_attention_state(
    config: GroundingConfig, latent_side: int, recorder: CrossAttentionRecorder
) -> AttentionModulationState:
    """The attention processor's state for one training batch: re-weighting off (the recorder keeps the maps the
    grounding losses read) until a modulated batch sets regions and switches it on, at the configured weights.
    Both halves of the batch are modulated: training has no classifier-free-guidance half to leave alone."""
    return AttentionModulationState(
        latent_size=(latent_side, latent_side),
        recorder=recorder,
        conditional_half_only=False,
        cross_attention_weight=config.modulated_cross_attention_weight,
        self_attention_weight=config.modulated_self_attention_weight,
    )


def fresh_models(
    text_config: CLIPTextConfig, unet_config: dict, seed: int
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """New, randomly initialised models of the architectures ``text_config`` and ``unet_config`` describe (seeded
    by ``seed``), in float32: the starting point of ``from_scratch`` training."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config).float()
        unet = UNet2DConditionModel.from_config(unet_config).float()
    return text_encoder, unet


def ground_world(config: GroundingConfig) -> dict:
    """Fine-tune (or resume fine-tuning) the world's UNet and text encoder; write the grounded folder."""
    torch.set_num_threads(config.num_threads)
    world = Path(config.world)
    if not (world / "model_index.json").is_file():
        raise UsageError(f"world {world}: not a shapes-world pipeline folder (no model_index.json)")
    tokenizer = CLIPTokenizer.from_pretrained(world, subfolder="tokenizer")
    text_config = CLIPTextConfig.from_pretrained(world, subfolder="text_encoder")
    if config.prompt_length:
        if config.prompt_length > text_config.max_position_embeddings:
            raise UsageError(
                f"prompt_length {config.prompt_length}: the text encoder has only "
                f"{text_config.max_position_embeddings} positions"
            )
        tokenizer.model_max_length = config.prompt_length
    if config.from_scratch:
        text_encoder, unet = fresh_models(
            text_config, UNet2DConditionModel.load_config(world, subfolder="unet"), config.seed
        )
    else:
        text_encoder = CLIPTextModel.from_pretrained(world, subfolder="text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(world, subfolder="unet", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(world, subfolder="vae", dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(world, subfolder="scheduler")
    latent_side = unet.config.sample_size
    grids = sorted({latent_side >> level for level in range(len(unet.config.block_out_channels))}, reverse=True)
    data = build_data(config, tokenizer, vae, grids)
    del vae

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(config.seed + 40)
    # train_world's stage checkpoints: safetensors only, nothing is unpickled on resume.
    models = torch.nn.ModuleList([unet, text_encoder])
    checkpoint = checkpoint_path(config.work, "grounding")
    step = start = resume_stage(checkpoint, models, optimizer, generator, ema)

    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weights = torch.clamp(snr, max=config.snr_gamma) / snr
    modulated_weights = modulated_loss_weights(snr, config.snr_gamma, config.modulated_x0_weight_cap)
    length = tokenizer.model_max_length
    empty_ids = tokenizer([""], padding="max_length", max_length=length, return_tensors="pt").input_ids
    unet.set_attn_processor(RealignAttnProcessor())
    log_file = config.work / "log.jsonl"
    end = min(config.steps, config.stop_after_steps or config.steps)
    bar = tqdm(total=end, initial=min(step, end), desc="ground", mininterval=5.0, dynamic_ncols=True)
    started, sums = time.time(), {}
    unet.train()
    text_encoder.train()
    while step < end:
        set_lr(optimizer, lr_at(step, config.learning_rate, config.steps, config.warmup_steps, config.min_lr_ratio))
        index = torch.randint(len(data.latents), (config.batch_size,), generator=generator)
        clean = data.latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < config.caption_dropout
        modulated = is_modulated_step(config, step, generator)
        if modulated:
            low, high = config.modulation_min_timestep, noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(low, high, (1,), generator=generator).expand(len(index)).clone()
        ids = torch.where(dropped[:, None], empty_ids, data.ids[index])
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)

        encoded = text_encoder(ids)[0]
        empty = text_encoder(empty_ids)[0]
        padding = padding_positions(ids, tokenizer.eos_token_id)
        padding_loss = ((encoded - empty.detach()) ** 2).mean(-1)[padding].mean()
        # What the UNet sees: the words, then the empty prompt's end and padding (term 1), in every scene or in the
        # padding_dropout share of them. Drawn only when asked for, so other runs keep their random stream.
        seen = blank_padding_rows(encoded, empty, padding, rows_to_blank(config, len(index), generator))
        recorder = CrossAttentionRecorder(keep_graph=True)
        state = training_attention_state(config, latent_side, recorder)
        if modulated:
            state.regions = true_mask_regions(data, index, dropped, latent_side)
            loose = torch.zeros(len(index), dtype=torch.bool)
            if config.loose_region_fraction > 0:
                loose = torch.rand(len(index), generator=generator) < config.loose_region_fraction
            for row in loose.nonzero()[:, 0].tolist():
                if not bool(dropped[row]):
                    masks = data.masks[latent_side][index[row]]
                    state.regions.labels[row] = loose_region_labels(masks, generator)
            state.modulate, state.timestep = True, float(timesteps[0])
        prediction = unet(noisy, timesteps, seen, cross_attention_kwargs={"realign_state": state}).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        weights = modulated_weights[timesteps] if modulated else loss_weights[timesteps]
        denoising_loss = (per_sample * weights).mean()

        present = data.word_tokens[index].any(-1) & ~dropped[:, None]
        token_loss = pixel_loss = torch.zeros(())
        maps_by_grid = recorder.mean_maps()
        # Averaged over the resolutions (16×16, 8×8 and the 4×4 mid block), each already averaged over its layers.
        for (height, width), maps in maps_by_grid.items():
            attention = maps.reshape(len(index), height * width, -1)
            masks = data.masks[height][index].flatten(2)
            token_loss = token_loss + token_grounding_loss(attention, data.word_tokens[index], masks, present)
            pixel_loss = pixel_loss + pixel_grounding_loss(attention, data.word_tokens[index], masks, present)
        token_loss, pixel_loss = token_loss / len(maps_by_grid), pixel_loss / len(maps_by_grid)
        loss = (
            denoising_loss
            + config.padding_loss_weight * padding_loss
            + config.token_loss_weight * token_loss
            + config.pixel_loss_weight * pixel_loss
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(ema, params, step, config.ema_decay)
        step += 1
        bar.update(1)
        values = {
            "denoising": per_sample.mean().item(),
            "padding": padding_loss.item(),
            "token": token_loss.item(),
            "pixel": pixel_loss.item(),
            "modulated": float(modulated),
        }
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        if step % config.log_every == 0:
            record = {"step": step, **{k: v / config.log_every for k, v in sums.items()}}
            record["s_per_step"] = (time.time() - started) / (step - start)
            with open(log_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in record.items()))
            sums = {}
        if step % config.checkpoint_every == 0 or step == end:
            save_stage(checkpoint, step, models, optimizer, generator, ema)
    bar.close()

    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    unet.set_attn_processor(AttnProcessor2_0())
    export(config, unet, text_encoder, tokenizer)
    info = {"steps": step, "resumed_from": start, "seconds_this_run": time.time() - started}
    info["config"] = dataclasses.asdict(config)
    info["last_losses"] = last_logged_losses(log_file)
    (Path(config.output_dir) / "grounding_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_grounded_card(config, info)
    return info


def last_logged_losses(log_file: Path) -> dict | None:
    """The last line of the run's ``log.jsonl`` (losses averaged over ``log_every`` steps), or ``None``."""
    if not log_file.is_file():
        return None
    lines = log_file.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None


def grounding_command(config: GroundingConfig) -> str:
    """The ``realign world ground`` command line that repeats this run: ``--output`` and one ``--set`` per option
    that differs from its default (for the grounded world's model card)."""
    parts = ["realign", "world", "ground", "--output", str(config.output_dir)]
    defaults = GroundingConfig()
    for field in dataclasses.fields(GroundingConfig):
        value = getattr(config, field.name)
        if field.name == "output_dir" or value == getattr(defaults, field.name):
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts += ["--set", f"{field.name}={text}"]
    return shlex.join(parts)


# The grounded world's model card (huggingface_hub's ``ModelCard.from_template``, Jinja2). It replaces the card
# copied from the starting world, which describes a model this folder no longer holds.
GROUNDED_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: the shapes world with grounded words

A standard diffusers `StableDiffusionPipeline` folder made by `realign_pipeline.shapes.ground_world`
(issue [F]): its UNet and text encoder were {{ origin }}, with training terms that make each object's words,
not the padding, carry the object and attend where it is drawn. Tokenizer, VAE, scheduler and captioner are
those of `{{ world }}`.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{{ config.output_dir }}")
image = pipe("a red circle on the left of a blue square", num_inference_steps=25, guidance_scale=4.0).images[0]
```

## How it was made

```
{{ command }}
```

{{ steps }} optimizer steps of batch {{ config.batch_size }} on {{ config.num_images }} rendered scenes (held-out
pairings excluded), AdamW lr {{ config.learning_rate }} (warm-up {{ config.warmup_steps }}, cosine to
{{ config.min_lr_ratio }}×), EMA {{ config.ema_decay }} (the EMA weights are saved), {{ config.num_threads }}
threads, {{ minutes }} min (this run; a resumed run counts only its own part).

Terms beside the denoising loss (ε-prediction, Min-SNR-{{ config.snr_gamma }}):

{{ term_lines }}

Last logged losses (mean of {{ config.log_every }} steps): {{ losses }}
{%- if config.modulated_fraction > 0 %}

**Trained with re-weighting on.** This world learnt to follow DenseDiffusion's boosted word attention during
training, so it tests the fine stage's *implementation* (the right tokens, pixels, steps and halves move
objects; wrong ones do not). It is not evidence that the re-weighting works training-free, as it does on
Stable Diffusion.
{%- endif %}

## Measuring it

```
realign world probe --world {{ config.output_dir }} --split development
realign eval --benchmark layout --world {{ config.output_dir }} --split development
```

## Files

{{ file_lines }}

## Configuration

```json
{{ config_json }}
```
"""


def grounding_term_lines(config: GroundingConfig) -> list[str]:
    """One Markdown bullet per training term ``config`` switches on, with its weight."""
    lines = []
    if config.blank_padding:
        lines.append(
            f"- blank padding: the UNet sees the empty prompt's encodings from `<|endoftext|>` on, and the text "
            f"encoder is pulled to produce them there (MSE, weight {config.padding_loss_weight})"
        )
    elif config.padding_dropout > 0:
        lines.append(
            f"- padding kept, but blanked (the empty prompt's encodings) in a random {config.padding_dropout:.0%} of "
            "the scenes, whose words alone must then carry the objects"
        )
    else:
        lines.append("- padding kept: the UNet sees the text encoder's own end and padding encodings")
    if config.prompt_length:
        lines.append(f"- prompts padded to {config.prompt_length} tokens (the tokenizer's `model_max_length`)")
    lines.append(f"- TokenCompose's token loss (arXiv 2312.03626, Eq. 3), weight {config.token_loss_weight}")
    lines.append(f"- TokenCompose's pixel loss (Eq. 4), weight {config.pixel_loss_weight}")
    if config.modulated_fraction > 0:
        lines.append(
            f"- re-weighting on in {config.modulated_fraction:.0%} of batches"
            + (f" from step {config.modulated_from_step}" if config.modulated_from_step else "")
            + " (cross-attention weight "
            f"{config.modulated_cross_attention_weight}, self-attention weight "
            f"{config.modulated_self_attention_weight}, timesteps ≥ {config.modulation_min_timestep}), "
            f"{config.loose_region_fraction:.0%} of their scenes with loose "
            f"regions; their ε-loss weighted by max(Min-SNR, min(1/SNR, {config.modulated_x0_weight_cap}))"
        )
    return lines


def starting_world_name(config: GroundingConfig) -> str:
    """The world ``config`` starts from, as a card names it: the package's own world by its place in the package
    (not this machine's absolute path to it), any other by the path given."""
    if Path(config.world).resolve() == WORLD.resolve():
        return "realign_pipeline/shapes/world (the built-in world)"
    return config.world


def write_grounded_card(config: GroundingConfig, info: dict) -> Path:
    """``README.md`` of the grounded folder (``GROUNDED_CARD_TEMPLATE``): what was trained, from what, how."""
    from huggingface_hub import ModelCard

    output = Path(config.output_dir)
    world = starting_world_name(config)
    losses = info.get("last_losses") or {}
    card = ModelCard.from_template(
        world_card_data(),
        template_str=GROUNDED_CARD_TEMPLATE,
        config=config,
        name=output.name,
        world=world,
        origin="trained from a fresh initialisation" if config.from_scratch else f"fine-tuned from `{world}`",
        command=grounding_command(config),
        steps=info["steps"],
        minutes=f"{info['seconds_this_run'] / 60:.1f}",
        term_lines="\n".join(grounding_term_lines(config)),
        losses=", ".join(f"{key} {value:.4g}" for key, value in losses.items() if key not in ("step", "s_per_step"))
        or "none logged",
        file_lines="\n".join(weight_file_lines(output)[0]),
        config_json=json.dumps({**dataclasses.asdict(config), "world": world}, indent=2),
    )
    card.save(output / "README.md")
    return output / "README.md"


def export(
    config: GroundingConfig, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> Path:
    """The grounded world: a copy of the world folder with the new UNet (float16) and text encoder, and the
    tokenizer with its new ``model_max_length`` where ``prompt_length`` set one."""
    output = Path(config.output_dir)
    world = Path(config.world)
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(world, output, ignore=shutil.ignore_patterns("unet-*", "training_info.json", "samples.png"))
    if config.prompt_length:
        tokenizer.save_pretrained(output / "tokenizer")
    unet.to(torch.float16).save_pretrained(output / "unet", safe_serialization=True)
    unet.to(torch.float32)
    text_encoder.save_pretrained(output / "text_encoder", safe_serialization=True)
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m realign_pipeline.shapes.ground_world``: the same as ``realign world ground``."""
    from ..cli import main as cli_main

    cli_main(["world", "ground", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
