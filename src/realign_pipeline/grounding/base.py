"""The two halves of a Grounded-SAM grounder: a box detector and a box-prompted segmenter.

Grounded-SAM (Ren et al., 2024) grounds text in two steps: an open-set detector (Grounding DINO, Liu et al.,
2023) turns each caption into a box, and Segment Anything (SAM, Kirillov et al., 2023) turns each box into a
mask. RealignDiff uses it to get one region mask per local caption. Keeping the halves behind two small
protocols lets either backend of each (transformers, or the original research packages) feed the other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import PIL.Image
import torch


@dataclass(frozen=True)
class BoxDetection:
    """One caption's best box.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels of the image it was detected in, clipped to the image.
        score: the detector's confidence for the caption's own tokens, in ``[0, 1]``.
    """

    box: tuple[float, float, float, float]
    score: float


@runtime_checkable
class BoxDetector(Protocol):
    """Turns an image and captions into at most one box per caption (``None`` where nothing passed)."""

    name: str

    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[BoxDetection | None]: ...


@runtime_checkable
class BoxSegmenter(Protocol):
    """Turns an image and boxes into one bool ``(height, width)`` mask per box, at the image's size."""

    name: str

    def __call__(
        self, image: PIL.Image.Image, boxes: list[tuple[float, float, float, float]]
    ) -> list[torch.Tensor]: ...


def import_optional(module: str, extra: str) -> ModuleType:
    """Import a package that only one of the package's extras installs, or say which extra to install.

    The research packages (segment-anything, groundingdino-py) import torchvision, so they are never
    imported when ``realign_pipeline`` is: only when a backend that needs them is built.
    """
    try:
        return importlib.import_module(module)
    # A torchvision built for another torch fails on import with a RuntimeError ("operator torchvision::nms
    # does not exist"); the fix is the same install, so it gets the same message.
    except (ImportError, RuntimeError) as error:
        raise ImportError(
            f"This grounding backend needs `{module}`, which is not installed (or failed to import: {error}). "
            f'Install it with `pip install "realign-pipeline[{extra}]"`; it also needs a torchvision that '
            "matches your torch."
        ) from error


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a backend runs on: the one asked for, else CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
