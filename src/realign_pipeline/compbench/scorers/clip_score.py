"""CLIPScore for non-spatial relations (T2I-CompBench's ``CLIPScore_eval``), through transformers.

The score is the cosine similarity of CLIP's image and text embeddings (no 2.5 factor, no clipping at 0),
with CLIP ViT-B/32 as in the official script. For complex prompts the text is the prompt without its
adjectives (the official ``--complex`` mode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import PIL.Image
import torch

from ..options import DEFAULT_CLIP_MODEL
from ..phrases import PhraseParser


class ClipSimilarity:
    """Cosine similarity between each image and one text under a transformers ``CLIPModel``."""

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ClipSimilarity:
        """A CLIP checkpoint by Hub name or local folder (safetensors only)."""
        from transformers import CLIPModel, CLIPProcessor

        processor = CLIPProcessor.from_pretrained(name_or_path)
        model = CLIPModel.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
        return cls(model.to(device).eval(), processor)

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image], text: str) -> list[float]:
        if not images:
            return []
        parameter = next(self.model.parameters())
        image_inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        text_inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        image_features = self.model.get_image_features(
            pixel_values=image_inputs["pixel_values"].to(parameter.device, parameter.dtype)
        )
        text_features = self.model.get_text_features(
            **{key: value.to(parameter.device) for key, value in text_inputs.items()}
        )
        image_features = getattr(image_features, "pooler_output", image_features).float()
        text_features = getattr(text_features, "pooler_output", text_features).float()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return (image_features @ text_features[0]).cpu().tolist()


class ClipScorer:
    """The non-spatial score of images of one prompt; ``complex_mode`` drops the prompt's adjectives first."""

    def __init__(self, similarity: ClipSimilarity, parser: PhraseParser, complex_mode: bool = False) -> None:
        self.similarity = similarity
        self.parser = parser
        self.complex_mode = complex_mode

    def text(self, prompt: str) -> str:
        return self.parser.without_adjectives(prompt) if self.complex_mode else prompt

    def __call__(self, images: Sequence[PIL.Image.Image], prompt: str) -> list[dict]:
        text = self.text(prompt)
        return [{"score": score, "details": {"text": text}} for score in self.similarity(images, text)]
