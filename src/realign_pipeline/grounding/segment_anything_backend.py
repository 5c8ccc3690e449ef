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
# The width of each registry model's ViT image encoder: enough to tell the released checkpoints apart.
ENCODER_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
PATCH_EMBEDDING = "image_encoder.patch_embed.proj.weight"


def load_weights_only_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pickled state dict read with ``weights_only=True``; a ``{"model": state_dict}`` wrapper is opened."""
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def sam_model_type_of(state_dict: dict[str, torch.Tensor]) -> str:
    """``"vit_b"``, ``"vit_l"`` or ``"vit_h"``: the registry model a SAM state dict belongs to, read from the width
    of its image encoder's patch embedding (768, 1024 or 1280 channels)."""
    weight = state_dict.get(PATCH_EMBEDDING)
    if weight is None:
        raise ValueError(f"not a segment-anything checkpoint: it has no {PATCH_EMBEDDING!r}")
    width = int(weight.shape[0])
    if width not in ENCODER_WIDTHS:
        raise ValueError(
            f"a segment-anything image encoder of width {width} matches no registry model "
            f"({', '.join(f'{name}: {w}' for w, name in ENCODER_WIDTHS.items())})"
        )
    return ENCODER_WIDTHS[width]


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
        model_type: str | None = None,
        device: str | torch.device | None = None,
    ) -> SegmentAnythingBoxSegmenter:
        """Build the checkpoint's model from segment-anything's registry and load ``checkpoint_path`` into it.

        Args:
            checkpoint_path: an original SAM checkpoint (``.pth``: ``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
                ``sam_vit_h_4b8939.pth``), or any file holding its state dict.
            model_type: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``; read from the checkpoint when not given, and
                checked against it when given.
            device: where the model runs; CUDA when available if not given.
        """
        if model_type is not None and model_type not in SEGMENT_ANYTHING_MODEL_TYPES:
            raise ValueError(f"`model_type` must be one of {SEGMENT_ANYTHING_MODEL_TYPES}, got {model_type!r}")
        segment_anything = import_optional("segment_anything", extra="sam")
        state_dict = load_weights_only_checkpoint(checkpoint_path)
        found = sam_model_type_of(state_dict)
        if model_type is not None and model_type != found:
            raise ValueError(f"`model_type` is {model_type!r} but {os.fspath(checkpoint_path)} holds a {found} model")
        # checkpoint=None: the registry's builder would otherwise unpickle the file with torch.load's defaults.
        model = segment_anything.sam_model_registry[found](checkpoint=None)
        model.load_state_dict(state_dict)
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
