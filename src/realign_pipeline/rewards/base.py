"""What every reward shares: the calling convention and image conversions.

A reward is a plain callable ``reward(images, prompts, **context) -> (scores, info)``:
``images`` are PIL images or a tensor ``(B, 3, H, W)`` in ``[-1, 1]`` (a decoded latent),
``scores`` is a float tensor ``(B,)`` (higher is better) and ``info`` a dict of whatever explains
the scores (captions, tags, per-token log-probabilities). ``context`` carries what some rewards
need (attention maps, region masks); a reward ignores keys it does not use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch

ImageBatch = Sequence[PIL.Image.Image] | torch.Tensor


@runtime_checkable
class Reward(Protocol):
    """``differentiable`` is True when gradients flow from ``scores`` back into a tensor ``images``."""

    differentiable: bool

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]: ...


def to_pil_images(images: ImageBatch) -> list[PIL.Image.Image]:
    """PIL images as they are; a ``(B, 3, H, W)`` tensor in ``[-1, 1]`` as 8-bit RGB images."""
    if isinstance(images, torch.Tensor):
        array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [PIL.Image.fromarray(item.permute(1, 2, 0).cpu().numpy()) for item in array]
    return [image.convert("RGB") for image in images]


def to_image_tensor(images: ImageBatch, device: torch.device | str | None = None) -> torch.Tensor:
    """A ``(B, 3, H, W)`` float tensor in ``[-1, 1]``; tensors pass through untouched (graph kept)."""
    if isinstance(images, torch.Tensor):
        return images if device is None else images.to(device)
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    sizes = {array.shape for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"Images of different sizes {sorted(sizes)} cannot be batched; resize them first.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device or "cpu")


def check_batch(images: ImageBatch, prompts: Sequence[str]) -> None:
    """Raise if the number of images and prompts differ (a silent zip would drop some)."""
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of strings, one per image, not a single string.")
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
