"""Attribute concentration: how much of each object's token attention falls inside its mask."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import ImageBatch

AttentionMaps = Mapping[tuple[int, int], torch.Tensor]  # (h, w) -> (B, h, w, tokens)
RegionSpec = tuple[Sequence[int], torch.Tensor]  # (prompt token positions, mask (H, W))


def regions_from_context(context: Mapping[str, Any], batch_size: int) -> list[list[RegionSpec]]:
    """Per image, its ``(token_indices, mask)`` pairs, from ``layouts`` (``Layout`` objects, as the
    pipeline returns them) or ``regions`` (already in that form) in ``context``."""
    if "layouts" in context and context["layouts"] is not None:
        per_image = [
            [(region.token_indices, region.mask) for region in layout.regions] for layout in context["layouts"]
        ]
    elif "regions" in context and context["regions"] is not None:
        per_image = [list(regions) for regions in context["regions"]]
    else:
        raise KeyError("Attribute concentration needs `layouts=` or `regions=` (token indices and masks) in context.")
    if len(per_image) != batch_size:
        raise ValueError(f"Got regions for {len(per_image)} images but attention maps for {batch_size}.")
    return per_image


def _mask_on_grid(mask: torch.Tensor, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Fraction of each attention cell covered by the mask (area interpolation keeps it soft)."""
    mask = torch.as_tensor(mask, device=device).float()
    return F.interpolate(mask[None, None], size=grid, mode="area")[0, 0]


def _attention_terms(
    maps: AttentionMaps, regions: list[list[RegionSpec]], resolutions: Iterable[tuple[int, int]] | None
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per image, the ``(attention map (h, w), mask on that grid (h, w))`` of every object token."""
    grids = list(resolutions) if resolutions is not None else sorted(maps)
    missing = [grid for grid in grids if grid not in maps]
    if missing:
        raise KeyError(f"No attention maps recorded at {missing}; recorded: {sorted(maps)}.")
    terms: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in regions]
    for grid in grids:
        grid_maps = maps[grid]
        for image_index, image_regions in enumerate(regions):
            for token_indices, mask in image_regions:
                on_grid = _mask_on_grid(mask, grid, grid_maps.device)
                for token in token_indices:
                    terms[image_index].append((grid_maps[image_index, :, :, token], on_grid))
    return terms


def attention_share(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_u A_u M_u / Σ_u A_u``: the share of a token's attention inside the mask."""
    return (attention * mask).sum() / attention.sum().clamp(min=1e-8)


def attribute_concentration_loss(
    maps: AttentionMaps,
    regions: list[list[RegionSpec]],
    pixel_weight: float = 1.0,
    resolutions: Iterable[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """CoMat's attribute concentration loss ``L_token + pixel_weight · L_pixel``.

    CoMat (arXiv 2404.03653), §3.3, after TokenCompose: for object ``i`` with mask ``M_i`` and
    prompt tokens ``T_i``, and ``A_{u,k}`` token ``k``'s cross-attention probability at cell ``u``,

        L_token = mean_{i, k∈T_i} (1 − Σ_u A_{u,k} M_{i,u} / Σ_u A_{u,k})²
        L_pixel = mean_{i, k∈T_i, u} BCE(A_{u,k}, M_{i,u})

    averaged over the recorded attention resolutions. Keep ``maps`` differentiable
    (``CrossAttentionRecorder(keep_graph=True)``) to train with it. Zero when no image has a region.
    """
    terms = [term for image_terms in _attention_terms(maps, regions, resolutions) for term in image_terms]
    if not terms:
        reference = next(iter(maps.values()))
        return reference.sum() * 0.0
    token_loss = torch.stack([(1.0 - attention_share(a, m)) ** 2 for a, m in terms]).mean()
    pixel_loss = torch.stack(
        [F.binary_cross_entropy(a.float().clamp(1e-6, 1 - 1e-6), m.float()) for a, m in terms]
    ).mean()
    return token_loss + pixel_weight * pixel_loss


class AttributeConcentrationReward:
    """CoMat's attribute concentration as a score: mean share of object-token attention in its mask.

    CoMat (arXiv 2404.03653), §3.3: ``r = mean_{i, k∈T_i} Σ_u A_{u,k} M_{i,u} / Σ_u A_{u,k}`` in
    ``[0, 1]``, 1 when every object's tokens attend only inside the object. The images are not
    looked at: the context must carry ``attention_maps`` (``CrossAttentionRecorder.mean_maps()``,
    recorded while these images were generated) and ``layouts`` or ``regions``. An image without a
    region scores NaN (undefined), so average with ``nanmean``.
    """

    differentiable = True  # through the attention maps, when they were recorded with keep_graph=True

    def __init__(self, resolutions: Iterable[tuple[int, int]] | None = None) -> None:
        self.resolutions = list(resolutions) if resolutions is not None else None

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]:
        maps = context.get("attention_maps")
        if maps is None:
            raise KeyError("Attribute concentration needs `attention_maps=recorder.mean_maps()` in context.")
        batch_size = next(iter(maps.values())).shape[0]
        regions = regions_from_context(context, batch_size)
        terms = _attention_terms(maps, regions, self.resolutions)
        reference = next(iter(maps.values()))
        scores = torch.stack(
            [
                torch.stack([attention_share(a, m) for a, m in image_terms]).mean()
                if image_terms
                else reference.new_tensor(float("nan"))
                for image_terms in terms
            ]
        )
        return scores, {"num_terms": [len(image_terms) for image_terms in terms]}
