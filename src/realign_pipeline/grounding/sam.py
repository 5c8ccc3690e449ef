"""Masks from boxes with Segment Anything (SAM, Kirillov et al., 2023), through transformers.

SAM encodes the image once and decodes one mask per box prompt; all boxes of an image go through one
`SamModel` forward, so the cost of the ViT image encoder does not grow with the number of captions.
"""

from __future__ import annotations

import os

import PIL.Image
import torch

from .base import resolve_device


class SamBoxSegmenter:
    """One bool mask per box from transformers' `SamModel`, at the image's size.

    Args:
        model: a `SamModel` in eval mode, on the device it should run on.
        processor: its `SamProcessor`.
    """

    name = "sam"

    def __init__(self, model: torch.nn.Module, processor):
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = "facebook/sam-vit-base",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> SamBoxSegmenter:
        """Load a SAM checkpoint (Hub id or folder) and its processor; safetensors weights only.

        Args:
            device: where the model runs; CUDA when available if not given.
            dtype: the model's dtype; float32 if not given.
            kwargs: passed to both ``from_pretrained`` calls (``revision``, ``cache_dir``, ``local_files_only``).
        """
        from transformers import SamModel, SamProcessor

        processor = SamProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = SamModel.from_pretrained(
            pretrained_model_name_or_path, dtype=dtype or torch.float32, use_safetensors=True, **kwargs
        )
        model.to(resolve_device(device)).eval()
        return cls(model, processor)

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, boxes: list[tuple[float, float, float, float]]) -> list[torch.Tensor]:
        """Bool ``(height, width)`` CPU masks, one per ``(x0, y0, x1, y1)`` pixel box, in one forward pass."""
        if not boxes:
            return []
        image = image.convert("RGB")
        input_boxes = [[[float(value) for value in box] for box in boxes]]  # one image, all its boxes
        inputs = self.processor(images=image, input_boxes=input_boxes, return_tensors="pt")
        parameter = next(self.model.parameters())
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
            input_boxes=inputs["input_boxes"].to(parameter.device, parameter.dtype),
            # A box leaves little ambiguity; Grounded-SAM asks for SAM's single mask, not its three candidates.
            multimask_output=False,
        )
        masks = self.processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0]  # (num_boxes, 1, height, width), bool
        return [mask[0].bool() for mask in masks]
