"""Grounded-SAM: one mask per local caption, boxes from Grounding DINO, masks from SAM.

RealignDiff (arXiv 2305.19599) grounds each local caption of the coarse image with Grounded-SAM (Ren et al.,
2024): Grounding DINO (Liu et al., 2023) finds the caption's box, Segment Anything (Kirillov et al., 2023)
cuts the object out of it. The masks become the regions of the re-weighted attention in the fine pass.

Masks may overlap (a cup on a table). This grounder returns them as they are; the pipeline turns them into a
partition, where the smaller mask wins each contested pixel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import PIL.Image
import torch

from .base import BoxDetection, BoxDetector, BoxSegmenter
from .boxes import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD, GroundingDinoBoxDetector
from .sam import SamBoxSegmenter


@dataclass
class GroundedMask:
    """What the grounder found for one caption.

    Attributes:
        caption: the caption as given.
        box: the detector's box, ``(x0, y0, x1, y1)`` in pixels.
        score: the detector's confidence for the caption.
        mask: bool ``(height, width)`` at the image's size, on the CPU.
    """

    caption: str
    box: tuple[float, float, float, float]
    score: float
    mask: torch.Tensor


class GroundedSamGrounder:
    """A [`Grounder`] that chains a box detector and a box-prompted segmenter (Grounded-SAM).

    Any [`BoxDetector`] feeds any [`BoxSegmenter`]: transformers' Grounding DINO and SAM (see
    [`from_pretrained`]), the original ``segment-anything`` package ([`SegmentAnythingBoxSegmenter`]) and the
    original Grounding DINO code ([`GroundingDinoPyBoxDetector`]).

    A caption gets ``None`` when the detector finds no box for it above its thresholds, or when SAM's mask for
    the box is empty; the pipeline then uses the attention-map mask for that caption and records
    ``source="attention"``. Every other mask is recorded with this grounder's ``name`` as its source.

    Args:
        detector: the box source.
        segmenter: the mask source; called once per image with all boxes.
        name: recorded as each mask's ``source``; ``"<detector name>+<segmenter name>"`` if not given.
    """

    def __init__(self, detector: BoxDetector, segmenter: BoxSegmenter, name: str | None = None):
        self.detector = detector
        self.segmenter = segmenter
        self.name = name or f"{detector.name}+{segmenter.name}"

    @classmethod
    def from_pretrained(
        cls,
        detector: str | os.PathLike = "IDEA-Research/grounding-dino-tiny",
        segmenter: str | os.PathLike = "facebook/sam-vit-base",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        name: str | None = None,
        **kwargs,
    ) -> GroundedSamGrounder:
        """Grounding DINO and SAM from transformers checkpoints (Hub ids or folders), safetensors only.

        Args:
            detector: a Grounding DINO checkpoint.
            segmenter: a SAM checkpoint.
            device: where both run; CUDA when available if not given.
            dtype: both models' dtype; float32 if not given.
            box_threshold: Grounding DINO's box threshold (see [`best_box_per_caption`]).
            text_threshold: Grounding DINO's text threshold (see [`best_box_per_caption`]).
            name: recorded as each mask's ``source``; ``"grounding-dino+sam"`` if not given.
            kwargs: passed to every ``from_pretrained`` call (``revision``, ``cache_dir``, ``local_files_only``).
        """
        return cls(
            GroundingDinoBoxDetector.from_pretrained(
                detector,
                device=device,
                dtype=dtype,
                box_threshold=box_threshold,
                text_threshold=text_threshold,
                **kwargs,
            ),
            SamBoxSegmenter.from_pretrained(segmenter, device=device, dtype=dtype, **kwargs),
            name=name,
        )

    def ground(self, image: PIL.Image.Image, captions: list[str]) -> list[GroundedMask | None]:
        """Box, score and mask for each caption (``None`` where there is no box or the mask is empty)."""
        detections: list[BoxDetection | None] = self.detector(image, captions)
        if len(detections) != len(captions):
            raise ValueError(f"the detector returned {len(detections)} boxes for {len(captions)} captions")
        found = [index for index, detection in enumerate(detections) if detection is not None]
        masks = self.segmenter(image, [detections[index].box for index in found]) if found else []
        if len(masks) != len(found):
            raise ValueError(f"the segmenter returned {len(masks)} masks for {len(found)} boxes")
        results: list[GroundedMask | None] = [None] * len(captions)
        for index, mask in zip(found, masks):
            if bool(mask.any()):
                detection = detections[index]
                results[index] = GroundedMask(captions[index], detection.box, detection.score, mask)
        return results

    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[torch.Tensor | None]:
        """One bool ``(height, width)`` mask per caption at the image's size, or ``None``."""
        return [None if result is None else result.mask for result in self.ground(image, captions)]
