"""CoMat's attribute concentration as a loss term of the ReFL step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..pipeline_realign_diff import (
    AttentionModulationState,
    CrossAttentionRecorder,
    PromptPhraseCaptioner,
    attention_map_grid,
    mask_to_tensor,
    masks_from_attention_maps,
    place_caption,
    realign_processors_installed,
    words_with_token_positions,
)
from ..rewards.attribute_concentration import RegionSpec, attribute_concentration_loss
from ..rewards.base import to_pil_images


class AttributeConcentrationTerm:
    """``weight · L_AC`` (CoMat, arXiv 2404.03653, §3.3) on the cross-attention of ReFL's gradient step.

    The prompt's object phrases come from the rule-based ``PromptPhraseCaptioner`` (or any
    ``captioner.phrases``); each phrase's tokens are found in the prompt as the pipeline finds them.
    Masks come from ``grounder(image, phrases)`` on the decoded ``x̂0`` (CoMat uses Grounded-SAM),
    or, with no grounder, from the step's own cross-attention maps (Otsu-cut, as the pipeline's
    attention grounder does) — a model-free stand-in that sharpens each object's attention onto the
    region it already favours rather than onto a detected object.
    """

    def __init__(
        self,
        tokenizer: Any,
        weight: float,
        grounder: Any | None = None,
        captioner: Any | None = None,
        pixel_weight: float = 1.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.weight = weight
        self.grounder = grounder
        self.captioner = captioner or PromptPhraseCaptioner()
        self.pixel_weight = pixel_weight

    @contextlib.contextmanager
    def recording(
        self, unet: torch.nn.Module, latent_size: tuple[int, int]
    ) -> Iterator[tuple[dict[str, Any], CrossAttentionRecorder]]:
        """Install the recording processor on ``unet`` (the unwrapped model) for one call; yields
        the ``cross_attention_kwargs`` to pass and the recorder (maps of every batch row, with graph)."""
        recorder = CrossAttentionRecorder(keep_graph=True)
        state = AttentionModulationState(latent_size=latent_size, recorder=recorder, conditional_half_only=False)
        with realign_processors_installed(unet):
            yield {"realign_state": state}, recorder

    def token_groups(self, prompt: str) -> tuple[list[str], list[list[int]]]:
        prompt_words = words_with_token_positions(self.tokenizer, prompt)
        phrases, groups = [], []
        for phrase in self.captioner.phrases(prompt):
            caption_words = words_with_token_positions(self.tokenizer, phrase)
            positions = place_caption(prompt_words, caption_words, self.tokenizer.model_max_length).prompt_positions
            if positions:
                phrases.append(phrase)
                groups.append(positions)
        return phrases, groups

    def regions(
        self, maps: dict[tuple[int, int], torch.Tensor], images: torch.Tensor, prompts: Sequence[str]
    ) -> list[list[RegionSpec]]:
        """Per image, ``(token positions, mask)`` of each object phrase that could be placed and grounded."""
        pil_images = to_pil_images(images) if self.grounder is not None else None
        # The finest cross-attention grid is the latent grid in Stable Diffusion's UNets.
        grid = attention_map_grid(list(maps), max(maps, key=lambda g: g[0] * g[1]))
        regions: list[list[RegionSpec]] = []
        for index, prompt in enumerate(prompts):
            phrases, groups = self.token_groups(prompt)
            if not groups:
                regions.append([])
                continue
            if self.grounder is not None:
                height, width = images.shape[-2:]
                found = self.grounder(pil_images[index], phrases)
                masks = [None if m is None else mask_to_tensor(m, height, width) for m in found]
            else:
                masks = masks_from_attention_maps(maps[grid][index].detach().float(), groups)
            regions.append([(group, mask) for group, mask in zip(groups, masks) if mask is not None and mask.any()])
        return regions

    def loss(
        self, recorder: CrossAttentionRecorder, rows: slice, images: torch.Tensor, prompts: Sequence[str]
    ) -> torch.Tensor:
        """``weight · L_AC`` for the batch rows ``rows`` (the conditional rows of the reward images)."""
        maps = {grid: values[rows] for grid, values in recorder.mean_maps().items()}
        regions = self.regions(maps, images.detach(), prompts)
        return self.weight * attribute_concentration_loss(maps, regions, pixel_weight=self.pixel_weight)
