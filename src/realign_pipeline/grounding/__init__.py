"""Grounders: one mask per local caption of an image (RealignDiff's Grounded-SAM step).

Every grounder implements the pipeline's `Grounder` protocol. The transformers backends need nothing beyond
the package's own requirements. The original research packages are optional: `segment-anything` (the
``[sam]`` extra) and `groundingdino-py` (the ``[groundingdino]`` extra) both import torchvision, and are
imported only when their backend is built, never by importing this package.
"""

from .base import BoxDetection, BoxDetector, BoxSegmenter, import_optional
from .boxes import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_TEXT_THRESHOLD,
    GroundingDinoBoxDetector,
    best_box_per_caption,
    caption_token_positions,
    detection_prompt,
)
from .grounded_sam import GroundedMask, GroundedSamGrounder
from .groundingdino_backend import GroundingDinoPyBoxDetector, GroundingDinoPyModel, build_groundingdino_py_model
from .sam import SamBoxSegmenter
from .segment_anything_backend import SegmentAnythingBoxSegmenter, load_weights_only_checkpoint

__all__ = [
    "DEFAULT_BOX_THRESHOLD",
    "DEFAULT_TEXT_THRESHOLD",
    "BoxDetection",
    "BoxDetector",
    "BoxSegmenter",
    "GroundedMask",
    "GroundedSamGrounder",
    "GroundingDinoBoxDetector",
    "GroundingDinoPyBoxDetector",
    "GroundingDinoPyModel",
    "SamBoxSegmenter",
    "SegmentAnythingBoxSegmenter",
    "best_box_per_caption",
    "build_groundingdino_py_model",
    "caption_token_positions",
    "detection_prompt",
    "import_optional",
    "load_weights_only_checkpoint",
]
