"""Grounders by name, for the command line, configs and short scripts.

    pipe.grounder = load_grounder("grounding-sam", device="cuda", dtype=torch.float16)

Models load once, here, on the device and dtype given (use the pipeline's), and then serve every call.
They are not pipeline components, so ``enable_model_cpu_offload`` does not move them: give them the
GPU device explicitly when the pipeline offloads. ``check_grounder_arguments`` checks a choice without
loading anything (the CLI calls it before any model loads).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # torch and the models load with the first model, not with this module (``realign --help``)
    import torch

    from ..pipeline_realign_diff import Grounder

GROUNDER_NAMES = ("attention", "grounding-sam", "segment-anything", "groundingdino-py")


def check_grounder_arguments(
    name: str,
    *,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_model_type: str | None = None,
    groundingdino_config: str | os.PathLike | None = None,
    groundingdino_checkpoint: str | os.PathLike | None = None,
) -> None:
    """What ``load_grounder`` needs, checked without loading anything; ``UsageError`` names the argument."""
    if name not in GROUNDER_NAMES:
        raise UsageError(f"`grounder` must be one of {GROUNDER_NAMES}, got {name!r}.")
    if name in ("attention", "grounding-sam"):
        return
    if sam_model_type is not None:
        from .segment_anything_backend import SEGMENT_ANYTHING_MODEL_TYPES

        if sam_model_type not in SEGMENT_ANYTHING_MODEL_TYPES:
            raise UsageError(
                f"`sam_model_type` must be one of {SEGMENT_ANYTHING_MODEL_TYPES}, got {sam_model_type!r}."
            )
    if name == "segment-anything" and sam_checkpoint is None:
        raise UsageError("`sam_checkpoint` is required for the 'segment-anything' grounder (a SAM .pth file).")
    if name == "groundingdino-py" and (groundingdino_config is None or groundingdino_checkpoint is None):
        raise UsageError(
            "the 'groundingdino-py' grounder needs `groundingdino_config` and `groundingdino_checkpoint`."
        )
    for argument, path in (
        ("sam_checkpoint", sam_checkpoint),
        ("groundingdino_config", groundingdino_config),
        ("groundingdino_checkpoint", groundingdino_checkpoint),
    ):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"`{argument}` must be an existing file, got {str(path)!r}.")


def load_grounder(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    detector: str | os.PathLike = "IDEA-Research/grounding-dino-tiny",
    segmenter: str | os.PathLike = "facebook/sam-vit-base",
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_model_type: str | None = None,
    groundingdino_config: str | os.PathLike | None = None,
    groundingdino_checkpoint: str | os.PathLike | None = None,
) -> Grounder | None:
    """A grounder by name; ``"attention"`` returns ``None``: the pipeline's own attention-map masks.

    Args:
        name: ``"attention"``, ``"grounding-sam"`` (Grounding DINO + SAM through transformers, the
            full RealignDiff configuration), ``"segment-anything"`` (Grounding DINO boxes, then the
            ``segment-anything`` package's predictor from ``sam_checkpoint``; ``[sam]`` extra) or
            ``"groundingdino-py"`` (groundingdino-py's model from ``groundingdino_config`` and
            ``groundingdino_checkpoint``, then SAM from ``sam_checkpoint`` if given, else ``segmenter``;
            ``[groundingdino]`` extra).
        device, dtype: where the models run.
        detector, segmenter: transformers checkpoints (Hub ids or folders) of Grounding DINO and SAM.
        box_threshold, text_threshold: Grounding DINO's thresholds (Grounded-SAM's defaults).
        sam_checkpoint, sam_model_type: an original segment-anything checkpoint and its model (``"vit_b"``,
            ``"vit_l"``, ``"vit_h"``), which is read from the checkpoint when not given.
    """
    check_grounder_arguments(
        name,
        sam_checkpoint=sam_checkpoint,
        sam_model_type=sam_model_type,
        groundingdino_config=groundingdino_config,
        groundingdino_checkpoint=groundingdino_checkpoint,
    )
    if name == "attention":
        return None
    from .boxes import GroundingDinoBoxDetector
    from .grounded_sam import GroundedSamGrounder
    from .groundingdino_backend import GroundingDinoPyBoxDetector
    from .sam import SamBoxSegmenter
    from .segment_anything_backend import SegmentAnythingBoxSegmenter

    if name == "grounding-sam":
        return GroundedSamGrounder.from_pretrained(
            detector, segmenter, device=device, dtype=dtype, box_threshold=box_threshold, text_threshold=text_threshold
        )
    if name == "segment-anything":
        boxes = GroundingDinoBoxDetector.from_pretrained(
            detector, device=device, dtype=dtype, box_threshold=box_threshold, text_threshold=text_threshold
        )
    else:
        boxes = GroundingDinoPyBoxDetector.from_checkpoint(
            groundingdino_config,
            groundingdino_checkpoint,
            device=device,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
        )
    if sam_checkpoint is not None:
        masks = SegmentAnythingBoxSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_model_type, device=device)
    else:
        masks = SamBoxSegmenter.from_pretrained(segmenter, device=device, dtype=dtype)
    return GroundedSamGrounder(boxes, masks)
