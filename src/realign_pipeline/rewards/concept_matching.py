"""Differentiable caption reward: how likely a captioner finds the prompt, given the image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import ImageBatch, check_batch, to_image_tensor

# OpenAI CLIP's normalisation, which BLIP's image processor uses too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConceptMatchingReward:
    """CoMat's concept matching: the captioner's teacher-forced log-likelihood of the prompt.

    CoMat (Jiang et al., arXiv 2404.03653), §3.2, concept matching: ``L_cap = −log p_C(prompt | x)``
    with ``x`` the generated image and ``C`` a frozen captioning model (BLIP). The reward here is
    the *mean per-token* log-probability of the prompt's tokens,

        r(x, prompt) = (1/|T|) Σ_{k∈T} log p_C(w_k | w_<k, x),

    so that prompts of different lengths score on one scale (CoMat sums; the mean differs only by
    the constant ``|T|`` per prompt). Resizing and normalisation happen inside the autograd graph,
    so when ``images`` is a decoded tensor the gradient reaches the latents and the UNet.

    Args:
        model: a ``BlipForConditionalGeneration`` (frozen here).
        tokenizer: its tokenizer (BERT's, with BLIP's ``[DEC]`` start token as ``bos``).
        image_size: the side the captioner expects (384 for BLIP).
        prompt_prefix: text fed before the prompt and not scored, as BLIP captions are trained
            with one ("a picture of ").
        include_eos: also score the end-of-caption token (penalises content beyond the prompt).
    """

    differentiable = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_size: int = 384,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        prompt_prefix: str = "a picture of ",
        include_eos: bool = False,
        max_length: int = 64,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_mean = torch.tensor(image_mean).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std).view(1, 3, 1, 1)
        self.prompt_prefix = prompt_prefix
        self.include_eos = include_eos
        self.max_length = max_length
        self.bos_token_id = model.config.text_config.bos_token_id

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "Salesforce/blip-image-captioning-base",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> ConceptMatchingReward:
        """Load a BLIP captioning model and its processor (its image size, mean and std are used)."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained(name_or_path)
        model = BlipForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype).to(device)
        image_processor = processor.image_processor
        size = image_processor.size
        kwargs.setdefault("image_size", int(size["height"]) if hasattr(size, "__getitem__") else int(size))
        kwargs.setdefault("image_mean", image_processor.image_mean)
        kwargs.setdefault("image_std", image_processor.image_std)
        return cls(model, processor.tokenizer, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images to the captioner's normalised input, differentiably."""
        pixels = (images.float() + 1.0) / 2.0
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            # Antialiased bicubic as the captioner's own (PIL) resize, but inside the graph.
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        mean, std = self.image_mean.to(pixels.device), self.image_std.to(pixels.device)
        return (pixels - mean) / std

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]:
        check_batch(images, prompts)
        parameter = next(self.model.parameters())
        pixel_values = self.preprocess(to_image_tensor(images, device=parameter.device)).to(parameter.dtype)

        texts = [self.prompt_prefix + prompt.strip() for prompt in prompts]
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(parameter.device)
        input_ids = batch["input_ids"].clone()
        input_ids[:, 0] = self.bos_token_id  # BLIP's decoder starts from [DEC], not [CLS]
        attention_mask = batch["attention_mask"]

        logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        # Position j predicts token j + 1 (teacher forcing).
        log_probs = logits[:, :-1].float().log_softmax(dim=-1)
        targets = input_ids[:, 1:]
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

        scored = attention_mask[:, 1:].bool().clone()
        num_prefix = len(self.tokenizer(self.prompt_prefix.strip(), add_special_tokens=False)["input_ids"])
        scored[:, :num_prefix] = False
        if not self.include_eos:
            scored &= targets != self.tokenizer.sep_token_id
        counts = scored.sum(dim=1)
        if (counts == 0).any():
            raise ValueError("A prompt has no tokens to score (empty prompt, or truncated away).")
        scores = (token_log_probs * scored).sum(dim=1) / counts
        info = {
            "token_log_probs": [values[mask].detach().cpu() for values, mask in zip(token_log_probs, scored)],
        }
        return scores, info
