"""Masks from boxes with Meta's original ``segment-anything`` package (SAM, Kirillov et al., 2023).

For users who have the original SAM checkpoints (``sam_vit_b_01ec64.pth`` and the like) rather than
transformers' conversions. Needs the ``[sam]`` extra, which brings torchvision: the package is imported when
a segmenter is built, never when ``realign_pipeline`` is.

The checkpoints are pickles. segment-anything's own loader unpickles them with no restriction, which can
run code hidden in a file; this backend builds the model empty and loads the weights itself with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import torch

from .base import import_optional, resolve_device

SEGMENT_ANYTHING_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


def load_weights_only_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pickled state dict read with ``weights_only=True``; a ``{"model": state_dict}`` wrapper is opened."""
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


class SegmentAnythingBoxSegmenter:
    """One bool mask per box from segment-anything's `SamPredictor`, at the image's size.

    The image is embedded once (`SamPredictor.set_image`), then all boxes are decoded in one batched
    `predict_torch` call.

    Args:
        predictor: a ``segment_anything.SamPredictor`` around a model in eval mode.
    """

    name = "segment-anything"

    def __init__(self, predictor):
        self.predictor = predictor

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike,
        model_type: str = "vit_b",
        device: str | torch.device | None = None,
    ) -> SegmentAnythingBoxSegmenter:
        """Build ``model_type`` from segment-anything's registry and load ``checkpoint_path`` into it.

        Args:
            checkpoint_path: an original SAM checkpoint (``.pth``), or any file holding its state dict.
            model_type: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``, matching the checkpoint.
            device: where the model runs; CUDA when available if not given.
        """
        segment_anything = import_optional("segment_anything", extra="sam")
        if model_type not in SEGMENT_ANYTHING_MODEL_TYPES:
            raise ValueError(f"`model_type` must be one of {SEGMENT_ANYTHING_MODEL_TYPES}, got {model_type!r}")
        # checkpoint=None: the registry's builder would otherwise unpickle the file with torch.load's defaults.
        model = segment_anything.sam_model_registry[model_type](checkpoint=None)
        model.load_state_dict(load_weights_only_checkpoint(checkpoint_path))
        model.to(resolve_device(device)).eval()
        return cls(segment_anything.SamPredictor(model))

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, boxes: list[tuple[float, float, float, float]]) -> list[torch.Tensor]:
        """Bool ``(height, width)`` CPU masks, one per ``(x0, y0, x1, y1)`` pixel box."""
        if not boxes:
            return []
        array = np.asarray(image.convert("RGB"))
        self.predictor.set_image(array, image_format="RGB")
        device = self.predictor.device
        box_tensor = torch.tensor([list(map(float, box)) for box in boxes], dtype=torch.float32, device=device)
        masks, _, _ = self.predictor.predict_torch(
            point_coords=None,
            point_labels=None,
            boxes=self.predictor.transform.apply_boxes_torch(box_tensor, array.shape[:2]),
            # A box leaves little ambiguity; Grounded-SAM asks for SAM's single mask, not its three candidates.
            multimask_output=False,
        )
        self.predictor.reset_image()
        return [mask[0].bool().cpu() for mask in masks]
