"""Is the shapes world a stand-in for Stable Diffusion where RealignDiff needs one? Three measurements.

    realign world probe --world <folder> --split development

RealignDiff's fine stage (after DenseDiffusion) assumes that a word's cross-attention marks where its object
is drawn (Prompt-to-Prompt, DAAM) and that the words, not the padding, carry the objects. On generated
images of a prompt split (each object located by the judge) this module measures:

1. ``inside_share``: of the cross-attention on an object's words (colour and shape) at the 16×16 layers,
   the share that falls on the object's pixels; ``word_mass``: the attention mass those pixels give to
   their own words (the rest goes to other words, ``<|startoftext|>``, the end token and the padding, each
   share given in ``object_attention_split``);
2. ``attention_mask_iou``: the IoU of the masks that the pipeline's own attention grounder
   (``masks_from_attention_maps`` over the steps the coarse pass runs: the first 30%, the pipeline's default)
   gives each object phrase with the judge's mask of that object in the finished image from the same noise,
   and ``attention_mask_iou_all_steps`` the same for masks made over every step (a coarse pass run to the end,
   as in the paper); the masks' precision and recall say whether a low IoU is a mask too large or misplaced;
3. the blank-the-words test: each named colour's presence (and each named object's: its colour and its shape
   together, ``named_object_present``) when the prompt is encoded as it is, when the
   word tokens' encodings are replaced by the empty prompt's at the same positions (everything else, end
   token and padding included, left as the prompt's), and for the empty prompt. If the words carry the
   objects, blanking them drops named colours to the empty prompt's rate. And its converse, "words only":
   the end token and the padding blanked instead, the words left as the prompt's. A world that reads its
   prompt from the padding loses its colours there, as re-weighting, which pushes a region's attention off
   the padding, asks it to do without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from ..pipeline_realign_diff import (
    AttentionModulationState,
    CrossAttentionRecorder,
    RealignAttnProcessor,
    attention_map_grid,
    masks_from_attention_maps,
    words_with_token_positions,
)
from .data import COLOURS, IMAGE_SIZE
from .ground_world import blank_padding_rows, padding_positions, phrase_token_positions
from .judge import judge, named_object_masks


@dataclass
class ProbeResult:
    """Per-object and per-image measurements; ``summary()`` averages them."""

    inside_share: list[float] = field(default_factory=list)
    word_mass: list[float] = field(default_factory=list)
    attention_split: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in SPLIT_KEYS})
    attention_mask_iou: list[float] = field(default_factory=list)
    # Why an IoU is low: the share of the attention mask on the object (precision) and of the object under the
    # mask (recall); and the IoU that masks made from every step's maps would give, not the coarse pass's only.
    attention_mask_precision: list[float] = field(default_factory=list)
    attention_mask_recall: list[float] = field(default_factory=list)
    attention_mask_iou_all_steps: list[float] = field(default_factory=list)
    colour_present: dict[str, list[bool]] = field(default_factory=lambda: {key: [] for key in PROMPT_CONDITIONS})
    # Per named object group, under each condition: drawn with its colour and its shape. Colours alone can come
    # through where the objects do not (a red blob for "a red circle").
    object_present: dict[str, list[bool]] = field(default_factory=lambda: {key: [] for key in PROMPT_CONDITIONS})
    objects_found: int = 0
    objects_named: int = 0

    def summary(self) -> dict:
        def mean(values: list) -> float:
            return float(np.mean(values)) if values else math.nan

        return {
            "objects_named": self.objects_named,
            "objects_found_by_judge": self.objects_found,
            "inside_share": mean(self.inside_share),
            "word_mass": mean(self.word_mass),
            "object_attention_split": {key: mean(values) for key, values in self.attention_split.items()},
            "attention_mask_iou": mean(self.attention_mask_iou),
            "attention_mask_iou_at_least_0.5": mean([v >= 0.5 for v in self.attention_mask_iou]),
            "attention_mask_precision": mean(self.attention_mask_precision),
            "attention_mask_recall": mean(self.attention_mask_recall),
            "attention_mask_iou_all_steps": mean(self.attention_mask_iou_all_steps),
            "attention_mask_iou_all_steps_at_least_0.5": mean([v >= 0.5 for v in self.attention_mask_iou_all_steps]),
            "named_colour_present": {key: mean(values) for key, values in self.colour_present.items()},
            "named_object_present": {key: mean(values) for key, values in self.object_present.items()},
        }


SPLIT_KEYS = ("own_words", "other_words", "start", "end", "padding")
PROMPT_CONDITIONS = ("prompt", "blanked", "words only", "empty")


def attention_split(maps: torch.Tensor, cells: torch.Tensor, own: list[int], end: int) -> dict[str, float]:
    """Where an object's pixels send their cross-attention, as shares of their total attention.

    ``maps`` ``(h, w, tokens)``: attention probabilities; ``cells`` ``(h, w)``: the object's area in each cell;
    ``own``: its word positions; ``end``: the end token's position. Keys (``SPLIT_KEYS``): its own words, the
    prompt's other words (between ``<|startoftext|>`` and the end token), ``<|startoftext|>``, the end token, and
    the padding after it. Prompt-to-Prompt and DAAM read word maps; this says how much of the mass they hold.
    """
    row = (maps * cells[..., None]).sum((0, 1))
    total = row.sum().clamp(min=1e-12)
    others = [p for p in range(1, end) if p not in own]
    return {
        "own_words": float(row[own].sum() / total),
        "other_words": float(row[others].sum() / total),
        "start": float(row[0] / total),
        "end": float(row[end] / total),
        "padding": float(row[end + 1 :].sum() / total),
    }


def judge_masks(image, prompt: str) -> list[np.ndarray | None]:
    """The judge's pixels of each object group (the union of its matching detections), ``None`` if not drawn."""
    return named_object_masks(judge(image, prompt).detections, prompt)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def covered_share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of ``a``'s pixels that ``b`` covers (0 for an empty ``a``): precision as
    ``covered_share(predicted, true)``, recall as ``covered_share(true, predicted)``."""
    area = a.sum()
    return float(np.logical_and(a, b).sum() / area) if area else 0.0


def upsampled(cells: torch.Tensor) -> np.ndarray:
    """A bool mask on the attention grid, as the image's pixels (nearest neighbour)."""
    full = F.interpolate(cells.float()[None, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="nearest")
    return full[0, 0].numpy() > 0.5


def prompt_and_empty_encodings(
    pipe: StableDiffusionPipeline, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts' token ids ``(B, L)``, their encodings ``(B, L, D)`` and the empty prompt's ``(1, L, D)``."""
    length = pipe.tokenizer.model_max_length
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    empty_ids = pipe.tokenizer([""], padding="max_length", max_length=length, return_tensors="pt").input_ids
    encoded = pipe.text_encoder(ids.input_ids.to(pipe.device))[0]
    empty = pipe.text_encoder(empty_ids.to(pipe.device))[0]
    return ids.input_ids, encoded, empty


def blanked_word_embeddings(pipe: StableDiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's encoding with every position between ``<|startoftext|>`` and the end token replaced by
    the empty prompt's encoding at the same position; and the empty prompt's encoding."""
    ids, encoded, empty = prompt_and_empty_encodings(pipe, prompts)
    words = torch.zeros(ids.shape, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        for word in words_with_token_positions(pipe.tokenizer, prompt):
            words[row, [p for p in word.token_positions if p < ids.shape[1] - 1]] = True
    blanked = torch.where(words[..., None].to(encoded.device), empty.expand_as(encoded), encoded)
    return blanked, empty.expand_as(encoded)


def blanked_padding_embeddings(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Each prompt's encoding with its end token and padding replaced by the empty prompt's encoding at the same
    positions: what the UNet has of the prompt when only the words speak."""
    ids, encoded, empty = prompt_and_empty_encodings(pipe, prompts)
    padding = padding_positions(ids, pipe.tokenizer.eos_token_id).to(encoded.device)
    every_row = torch.ones(len(prompts), dtype=torch.bool, device=encoded.device)
    return blank_padding_rows(encoded, empty, padding, every_row)


@torch.no_grad()
def probe_world(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    coarse_stop_fraction: float = 0.3,
) -> ProbeResult:
    """Measure the three properties on ``prompts`` × ``seeds`` (module docstring).

    ``pipe`` is a plain ``StableDiffusionPipeline`` of the world: the measurements are of the model, not of
    RealignDiff; the pipeline's attention processor is installed only to record cross-attention.
    """
    result = ProbeResult()
    pipe.unet.set_attn_processor(RealignAttnProcessor())
    latent = pipe.unet.config.sample_size
    coarse_steps = max(1, round(coarse_stop_fraction * num_inference_steps))
    # The prompts' conditions do not depend on the seed: encoded once.
    blanked, empty = blanked_word_embeddings(pipe, prompts)
    words_only = blanked_padding_embeddings(pipe, prompts)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        shape = (len(prompts), pipe.unet.config.in_channels, latent, latent)
        latents = torch.randn(shape, generator=generator)
        state = AttentionModulationState(latent_size=(latent, latent), recorder=CrossAttentionRecorder())
        early: dict = {}

        def keep_early_maps(pipeline, step, timestep, callback_kwargs, state=state, early=early):
            # The attention grounder sees only the steps the coarse pass runs.
            if step == coarse_steps - 1:
                early.update(state.recorder.mean_maps())
            return callback_kwargs

        images = pipe(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=latents.clone(),
            cross_attention_kwargs={"realign_state": state},
            callback_on_step_end=keep_early_maps,
        ).images
        all_steps = state.recorder.mean_maps()
        for index, (prompt, image) in enumerate(zip(prompts, images)):
            groups = phrase_token_positions(pipe.tokenizer, prompt)
            end = len(pipe.tokenizer(prompt).input_ids) - 1
            found = judge_masks(image, prompt)
            result.objects_named += len(groups)
            result.objects_found += sum(mask is not None for mask in found)
            maps16 = all_steps[(latent, latent)][index]
            grid = attention_map_grid(list(early), (latent, latent))
            own_masks = masks_from_attention_maps(early[grid][index], groups)
            all_step_masks = masks_from_attention_maps(all_steps[grid][index], groups)
            for tokens, mask, own, own_all_steps in zip(groups, found, own_masks, all_step_masks):
                if mask is None:
                    continue
                cells = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(latent, latent), mode="area")
                cells = cells[0, 0]
                word_map = maps16[..., tokens].sum(-1)
                result.inside_share.append(float((word_map * cells).sum() / word_map.sum().clamp(min=1e-12)))
                result.word_mass.append(float((word_map * cells).sum() / cells.sum().clamp(min=1e-12)))
                for key, share in attention_split(maps16, cells, tokens, end).items():
                    result.attention_split[key].append(share)
                own_full = upsampled(own)
                result.attention_mask_iou.append(iou(own_full, mask))
                result.attention_mask_precision.append(covered_share(own_full, mask))
                result.attention_mask_recall.append(covered_share(mask, own_full))
                result.attention_mask_iou_all_steps.append(iou(upsampled(own_all_steps), mask))

        for key, embeds in (("prompt", None), ("blanked", blanked), ("words only", words_only), ("empty", empty)):
            kwargs = (
                {"prompt": prompts} if embeds is None else {"prompt_embeds": embeds, "negative_prompt_embeds": empty}
            )
            images = pipe(
                **kwargs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents.clone(),
            ).images
            for prompt, image in zip(prompts, images):
                detections = judge(image, prompt).detections
                drawn = {d.colour for d in detections}
                named = [c for c in COLOURS if c in prompt.split()]
                result.colour_present[key].extend(colour in drawn for colour in named)
                result.object_present[key].extend(mask is not None for mask in named_object_masks(detections, prompt))
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m realign_pipeline.shapes.stand_in``: the same as ``realign world probe``."""
    import sys

    from ..cli import main as cli_main

    cli_main(["world", "probe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
