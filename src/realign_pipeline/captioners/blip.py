"""Image captions (BLIP, BLIP-2) and caption-derived tags, through transformers.

RealignDiff (arXiv 2305.19599) describes a generated image twice: a global caption from BLIP-2,
which also drives its caption reward, and a list of tags from RAM (Recognize Anything, Zhang et
al. 2023), which the LLM reads to write local captions; FineRewards' tag reward scores RAM's tags
too. ``BlipImageCaptioner`` is the first, for BLIP (``BlipForConditionalGeneration``) and BLIP-2
(``Blip2ForConditionalGeneration``) checkpoints alike.

RAM's weights are not in transformers, so ``CaptionTagger`` stands in for it: its tags are the
content words of the image's caption(s), in order of appearance. What that changes:

* RAM classifies every image against a fixed vocabulary of about 4,600 tags, one sigmoid per tag,
  so it finds objects a caption leaves out (BLIP captions name the one to three most salient
  things); caption tags have lower recall, and captioning with several prefixes helps only a bit.
* RAM's tags come from its vocabulary (``"teddy bear"``, singular nouns, no colours unless
  they are tags); caption tags are single words as the captioner wrote them, attributes
  included (``"red"``, ``"books"``).
* RAM has a per-tag threshold; caption tags have no score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import PIL.Image
import torch
from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

MODEL_CLASSES: dict[str, type] = {
    "blip": BlipForConditionalGeneration,
    "blip-2": Blip2ForConditionalGeneration,
}

# Words that name no object or attribute, plus BLIP's captioning boilerplate ("a picture of", the
# "arafed" artefact of BLIP-large) and the most common caption verbs.
CAPTION_STOP_WORDS = frozenset(
    "a an the this that these those some any each every one two three four five his her its their our your my "
    "and or but with without of on in at to into onto from by for as near next beside behind above below under "
    "over top bottom left right side front back between while is are was were be been being has have had "
    "it there here it's there's who which what very up down out off close "
    "picture pictures photo photos photograph photography image images view shot closeup background foreground "
    "arafed araffe arafly araf "
    "sitting standing laying lying holding looking made".split()
)


@runtime_checkable
class ImageCaptioner(Protocol):
    """Anything with ``caption(images) -> one caption per image``."""

    def caption(self, images: list[PIL.Image.Image]) -> list[str]: ...


@runtime_checkable
class ImageTagger(Protocol):
    """Anything with ``tags(images) -> a tag list per image``."""

    def tags(self, images: list[PIL.Image.Image]) -> list[list[str]]: ...


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float16`` and ``"float16"`` alike; ``None`` is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}.")
    return resolved


class BlipImageCaptioner:
    """Caption images with a BLIP or BLIP-2 captioning model; deterministic (greedy or beam search).

    Args:
        model: a ``BlipForConditionalGeneration`` or ``Blip2ForConditionalGeneration``.
        processor: its ``BlipProcessor`` / ``Blip2Processor``.
        max_new_tokens, min_new_tokens, num_beams, repetition_penalty: default generation arguments;
            each call of ``caption`` can override them.
        prefix: default text the caption starts with (conditional captioning, e.g. ``"a picture of"``);
            it is part of the returned caption. ``None`` captions unconditionally.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: BlipForConditionalGeneration | Blip2ForConditionalGeneration,
        processor: Any,
        *,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        num_beams: int = 3,
        repetition_penalty: float = 1.0,
        prefix: str | None = None,
        batch_size: int = 8,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.num_beams = num_beams
        self.repetition_penalty = repetition_penalty
        self.prefix = prefix
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> BlipImageCaptioner:
        """Load a BLIP or BLIP-2 captioning checkpoint (safetensors only), chosen by its config's ``model_type``.

        Args:
            model_id_or_path: a Hub id (``"Salesforce/blip2-opt-2.7b"``,
                ``"Salesforce/blip-image-captioning-large"``) or a folder from ``save_pretrained``.
            device: ``None`` is CUDA when available, else the CPU.
            dtype: ``None`` is float32; ``torch.float16`` or ``"float16"`` halves BLIP-2's memory on a GPU.
            **options: the constructor's keyword arguments (generation defaults, ``batch_size``).
        """
        model_type = AutoConfig.from_pretrained(model_id_or_path).model_type
        if model_type not in MODEL_CLASSES:
            raise ValueError(
                f"{model_id_or_path} is a {model_type!r} model; BlipImageCaptioner loads {sorted(MODEL_CLASSES)}."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = MODEL_CLASSES[model_type].from_pretrained(
            model_id_or_path, dtype=resolve_dtype(dtype), use_safetensors=True
        )
        processor = AutoProcessor.from_pretrained(model_id_or_path)
        return cls(model.to(device), processor, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[PIL.Image.Image],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
        repetition_penalty: float | None = None,
        prefix: str | None = None,
    ) -> list[str]:
        """One caption per image, in order. Arguments left ``None`` take the constructor's values."""
        generation = {
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "min_new_tokens": self.min_new_tokens if min_new_tokens is None else min_new_tokens,
            "num_beams": self.num_beams if num_beams is None else num_beams,
            "repetition_penalty": self.repetition_penalty if repetition_penalty is None else repetition_penalty,
            "do_sample": False,
        }
        prefix = self.prefix if prefix is None else prefix
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            text = [prefix] * len(batch) if prefix else None
            inputs = self.processor(images=batch, text=text, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            output_ids = self.model.generate(**inputs, **generation)
            # BLIP-2 with a decoder-only language model returns its input ids (the image's query
            # tokens, BOS) first; they are special tokens, so decoding drops them with the rest.
            texts = self.processor.batch_decode(output_ids, skip_special_tokens=True)
            captions.extend(" ".join(text.split()) for text in texts)
        return captions

    __call__ = caption


def tags_from_caption(caption: str, stop_words: Collection[str] = CAPTION_STOP_WORDS) -> list[str]:
    """The content words of ``caption``, lower-cased, each once, in order: ``"a red book on a table"`` ->
    ``["red", "book", "table"]``."""
    tags: list[str] = []
    for word in re.findall(r"[a-z][a-z'-]*", caption.lower()):
        word = word.strip("'-")
        if word and word not in stop_words and word not in tags:
            tags.append(word)
    return tags


class CaptionTagger:
    """Image tags read off captions: a stand-in for RAM (see the module docstring for what differs).

    Args:
        captioner: a ``BlipImageCaptioner`` or any ``ImageCaptioner``, or a callable ``images -> captions``.
        prefixes: one caption per prefix and image (``None`` is unconditional); their tags are merged.
            More prefixes find more objects, at one captioning pass each.
        stop_words: words that are never tags.
        max_tags: keep at most this many tags per image (in order of appearance); ``None`` keeps all.
    """

    def __init__(
        self,
        captioner: ImageCaptioner | Callable[[list[PIL.Image.Image]], list[str]],
        prefixes: Sequence[str | None] = (None,),
        stop_words: Collection[str] = CAPTION_STOP_WORDS,
        max_tags: int | None = None,
    ) -> None:
        if not prefixes:
            raise ValueError("prefixes needs at least one entry (None captions without a prefix).")
        self.captioner = captioner
        self.prefixes = list(prefixes)
        self.stop_words = frozenset(stop_words)
        self.max_tags = max_tags

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        prefixes: Sequence[str | None] = (None,),
        max_tags: int | None = None,
        **caption_options: Any,
    ) -> CaptionTagger:
        """A tagger over ``BlipImageCaptioner.from_pretrained(model_id_or_path, device, dtype, **caption_options)``."""
        captioner = BlipImageCaptioner.from_pretrained(model_id_or_path, device=device, dtype=dtype, **caption_options)
        return cls(captioner, prefixes=prefixes, max_tags=max_tags)

    def captions(self, images: Sequence[PIL.Image.Image]) -> list[list[str]]:
        """Each image's captions, one per prefix."""
        per_prefix = [self._caption(list(images), prefix) for prefix in self.prefixes]
        return [list(captions) for captions in zip(*per_prefix)]

    def tags(self, images: Sequence[PIL.Image.Image]) -> list[list[str]]:
        """A tag list per image."""
        return [self.tags_from_captions(captions) for captions in self.captions(images)]

    __call__ = tags

    def tags_from_captions(self, captions: Sequence[str]) -> list[str]:
        """The merged tags of one image's captions (no captioning: for captions already at hand)."""
        tags: list[str] = []
        for caption in captions:
            tags.extend(tag for tag in tags_from_caption(caption, self.stop_words) if tag not in tags)
        return tags[: self.max_tags] if self.max_tags is not None else tags

    def _caption(self, images: list[PIL.Image.Image], prefix: str | None) -> list[str]:
        if prefix is None:
            return self.captioner.caption(images) if hasattr(self.captioner, "caption") else self.captioner(images)
        if not hasattr(self.captioner, "caption"):
            raise TypeError("Prefixes need a captioner with a `caption(images, prefix=...)` method.")
        return self.captioner.caption(images, prefix=prefix)
