"""Grounders: one mask per local caption of an image (RealignDiff's Grounded-SAM step).

Every grounder implements the pipeline's `Grounder` protocol. The transformers backends need nothing beyond
the package's own requirements. The original research packages are optional: `segment-anything` (the
``[sam]`` extra) and `groundingdino-py` (the ``[groundingdino]`` extra) both import torchvision, and are
imported only when their backend is built, never by importing this package.
"""

from ..lazy_exports import lazy_exports

# Names load on first use (``lazy_exports``): importing the package (or its ``factory``, as ``realign --help``
# does) loads neither torch nor transformers.
_EXPORTS = {
    "BoxDetection": ".base",
    "BoxDetector": ".base",
    "BoxSegmenter": ".base",
    "DEFAULT_BOX_THRESHOLD": ".boxes",
    "DEFAULT_TEXT_THRESHOLD": ".boxes",
    "GROUNDER_NAMES": ".factory",
    "GroundedMask": ".grounded_sam",
    "GroundedSamGrounder": ".grounded_sam",
    "GroundingDinoBoxDetector": ".boxes",
    "GroundingDinoPyBoxDetector": ".groundingdino_backend",
    "GroundingDinoPyModel": ".groundingdino_backend",
    "SamBoxSegmenter": ".sam",
    "SegmentAnythingBoxSegmenter": ".segment_anything_backend",
    "best_box_per_caption": ".boxes",
    "build_groundingdino_py_model": ".groundingdino_backend",
    "caption_token_positions": ".boxes",
    "check_grounder_arguments": ".factory",
    "detection_prompt": ".boxes",
    "import_optional": ".base",
    "load_grounder": ".factory",
    "load_weights_only_checkpoint": ".segment_anything_backend",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
