"""Open-set boxes for captions with Grounding DINO (Liu et al., 2023), through transformers.

All captions of an image are detected in one forward pass. They are joined the way Grounding DINO was
trained on detection prompts, ``"a red car. a dog."``: its text encoder gives every phrase between full stops
its own attention block and position ids (the "sub-sentence" representation of the paper), so the captions do
not blur into each other, while the image backbone, by far the costliest part, runs once rather than once
per caption. Each box is then mapped back to a caption by the caption's own token positions in that text,
never by decoding a label string (two captions may share every word but the colour).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch

from .base import BoxDetection, resolve_device

# Grounded-SAM's demo defaults (Grounding DINO's README uses 0.35 for boxes).
DEFAULT_BOX_THRESHOLD = 0.3
DEFAULT_TEXT_THRESHOLD = 0.25


def caption_phrase(caption: str) -> str:
    """A caption as one Grounding DINO phrase: lower case, with no full stop or question mark inside.

    Grounding DINO's tokenizer treats "." and "?" as phrase separators, so one inside a caption would split
    it into two phrases.
    """
    text = caption.lower().replace(".", " ").replace("?", " ")
    return " ".join(text.split())


def detection_prompt(captions: Sequence[str]) -> tuple[str, list[tuple[int, int] | None]]:
    """Join captions into one detection prompt and give each caption's character span in it.

    ``["A red car", "a dog"]`` gives ``("a red car. a dog.", [(0, 9), (11, 16)])``. A caption with no words
    gets ``None`` and no place in the prompt.
    """
    pieces: list[str] = []
    spans: list[tuple[int, int] | None] = []
    position = 0
    for caption in captions:
        phrase = caption_phrase(caption)
        if not phrase:
            spans.append(None)
            continue
        spans.append((position, position + len(phrase)))
        pieces.append(phrase + ".")
        position += len(phrase) + 2  # the full stop and the space before the next phrase
    return " ".join(pieces), spans


def caption_token_positions(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int] | None]
) -> list[list[int]]:
    """For each caption span, the positions of the tokens whose characters lie inside it.

    ``offsets`` is the tokenizer's offset mapping for the whole prompt; special tokens have empty offsets
    and belong to no caption, and the full stops lie outside every span.
    """
    positions: list[list[int]] = []
    for span in spans:
        if span is None:
            positions.append([])
            continue
        start, end = span
        positions.append([i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end])
    return positions


def best_box_per_caption(
    probabilities: torch.Tensor,
    boxes: torch.Tensor,
    token_positions: Sequence[Sequence[int]],
    box_threshold: float,
    text_threshold: float,
) -> list[tuple[int, float] | None]:
    """Pick, for each caption, the query that matches the caption's tokens best.

    Args:
        probabilities: ``(num_queries, num_text_tokens)`` sigmoid of Grounding DINO's token logits.
        boxes: ``(num_queries, 4)`` the queries' boxes (any format; only used to check the shapes).
        token_positions: each caption's token positions in the prompt.
        box_threshold: a query is a box at all only if its best token probability, over the whole prompt,
            exceeds this (Grounding DINO's box threshold).
        text_threshold: a box belongs to a caption only if one of the caption's tokens exceeds this (Grounding
            DINO's text threshold, which there picks the words of a box's label).

    Returns:
        For each caption, ``(query index, score)`` with the score the caption's best token probability for
        that query, or ``None`` where no query passes both thresholds. Two captions may get the same query.
    """
    if probabilities.shape[0] != boxes.shape[0]:
        raise ValueError(f"{probabilities.shape[0]} query scores for {boxes.shape[0]} boxes")
    query_scores = probabilities.max(dim=-1).values
    picks: list[tuple[int, float] | None] = []
    for positions in token_positions:
        positions = [p for p in positions if p < probabilities.shape[-1]]  # tokens cut by max_text_len
        if not positions:
            picks.append(None)
            continue
        caption_scores = probabilities[:, positions].max(dim=-1).values
        passing = (query_scores > box_threshold) & (caption_scores > text_threshold)
        if not bool(passing.any()):
            picks.append(None)
            continue
        best = int(torch.where(passing, caption_scores, torch.full_like(caption_scores, -1.0)).argmax())
        picks.append((best, float(caption_scores[best])))
    return picks


def normalized_cxcywh_to_pixel_xyxy(box: torch.Tensor, width: int, height: int) -> tuple[float, float, float, float]:
    """A DETR-style ``(cx, cy, w, h)`` box in ``[0, 1]`` to ``(x0, y0, x1, y1)`` pixels, clipped to the image."""
    cx, cy, w, h = (float(v) for v in box)
    x0 = min(max((cx - w / 2) * width, 0.0), float(width))
    x1 = min(max((cx + w / 2) * width, 0.0), float(width))
    y0 = min(max((cy - h / 2) * height, 0.0), float(height))
    y1 = min(max((cy + h / 2) * height, 0.0), float(height))
    return (x0, y0, x1, y1)


def split_by_token_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group consecutive items so each group's lengths sum to at most ``budget`` (an item longer stays alone)."""
    groups: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if groups and used + length <= budget:
            groups[-1].append(index)
            used += length
        else:
            groups.append([index])
            used = length
    return groups


class GroundingDinoBoxDetector:
    """One box per caption from transformers' Grounding DINO (`GroundingDinoForObjectDetection`).

    Args:
        model: a zero-shot object detector with Grounding DINO's outputs (token ``logits`` and normalised
            ``pred_boxes``), in eval mode, on the device it should run on.
        processor: its processor (image processor + BERT tokenizer).
        box_threshold: see [`best_box_per_caption`].
        text_threshold: see [`best_box_per_caption`].
    """

    name = "grounding-dino"

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ):
        self.model = model
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = "IDEA-Research/grounding-dino-tiny",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        **kwargs,
    ) -> GroundingDinoBoxDetector:
        """Load a Grounding DINO checkpoint (Hub id or folder) and its processor; safetensors weights only.

        Args:
            device: where the model runs; CUDA when available if not given.
            dtype: the model's dtype; float32 if not given.
            kwargs: passed to both ``from_pretrained`` calls (``revision``, ``cache_dir``, ``local_files_only``).
        """
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        processor = AutoProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(
            pretrained_model_name_or_path, dtype=dtype or torch.float32, use_safetensors=True, **kwargs
        )
        model.to(resolve_device(device)).eval()
        return cls(model, processor, box_threshold=box_threshold, text_threshold=text_threshold)

    def max_text_len(self) -> int:
        """How many text tokens (special tokens included) the model reads in one prompt."""
        return int(getattr(self.model.config, "max_text_len", 256))

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[BoxDetection | None]:
        """The best box for each caption, or ``None`` where no box passes both thresholds."""
        image = image.convert("RGB")
        parameter = next(self.model.parameters())

        def forward(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = self.processor(images=image, text=text, return_tensors="pt")
            inputs = {
                key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
                for key, value in inputs.items()
            }
            outputs = self.model(**inputs)
            return outputs.logits[0], outputs.pred_boxes[0]

        return detect_boxes(
            image,
            captions,
            self.processor.tokenizer,
            self.max_text_len(),
            forward,
            self.box_threshold,
            self.text_threshold,
        )


def detect_boxes(
    image: PIL.Image.Image,
    captions: Sequence[str],
    tokenizer: Any,
    max_text_len: int,
    forward: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    box_threshold: float,
    text_threshold: float,
) -> list[BoxDetection | None]:
    """Grounding DINO's detection loop, whichever code runs the model (transformers or groundingdino-py).

    The captions go into as few prompts as fit ``max_text_len`` tokens (``"a red car. a cat."``; one prompt
    unless there are some 40 captions), ``forward(prompt)`` gives the token logits ``(queries, tokens)`` and
    normalised ``(cx, cy, w, h)`` boxes ``(queries, 4)`` for the image, and each caption takes its best box
    (``best_box_per_caption``) in pixel ``(x0, y0, x1, y1)``, or ``None``.
    """
    detections: list[BoxDetection | None] = [None] * len(captions)
    lengths = [len(tokenizer(caption_phrase(c) + ".", add_special_tokens=False)["input_ids"]) for c in captions]
    for chunk in split_by_token_budget(lengths, max_text_len - 2):  # [CLS] and [SEP]
        text, spans = detection_prompt([captions[i] for i in chunk])
        if not text:
            continue
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        logits, boxes = forward(text)
        probabilities, boxes = logits.float().sigmoid().cpu(), boxes.float().cpu()
        picks = best_box_per_caption(
            probabilities, boxes, caption_token_positions(offsets, spans), box_threshold, text_threshold
        )
        for index, pick in zip(chunk, picks):
            if pick is not None:
                query, score = pick
                box = normalized_cxcywh_to_pixel_xyxy(boxes[query], image.width, image.height)
                detections[index] = BoxDetection(box, score)
    return detections
