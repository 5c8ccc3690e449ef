"""BLIP-VQA attribute-binding score (T2I-CompBench's ``BLIPvqa_eval``), through transformers.

For each noun phrase of the prompt ("a green bench") BLIP-VQA is asked ``"a green bench?"``; its answer is
the probability of "yes" against "no" for the first answer token, ``p(yes) / (p(yes) + p(no))`` after a
softmax over the whole vocabulary (the official ``vqa_prob``). An image's score is the product of its
questions' answers; a prompt with no noun phrase scores 1 (the official script multiplies by 1 for a missing
question).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Protocol

import PIL.Image
import torch

from ..options import DEFAULT_VQA_MODEL
from ..phrases import PhraseParser


class YesProbability(Protocol):
    """``p(yes) / (p(yes) + p(no))`` for each (image, question) pair."""

    def __call__(self, images: Sequence[PIL.Image.Image], questions: Sequence[str]) -> list[float]: ...


def attribute_binding_score(answers: Sequence[float]) -> float:
    """The product of an image's "yes" probabilities, one per noun phrase (1 for none)."""
    for answer in answers:
        if not 0.0 <= answer <= 1.0 or math.isnan(answer):
            raise ValueError(f"a yes probability must be in [0, 1], got {answer}")
    return math.prod(answers)


def question_for(phrase: str) -> str:
    """The official question for a noun phrase: the phrase and a question mark."""
    return f"{phrase}?"


class BlipYesProbability:
    """transformers' ``BlipForQuestionAnswering``: encode the image, the question over it, then read the
    decoder's first-token distribution after its start token."""

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        self.yes_id = tokenizer.convert_tokens_to_ids("yes")
        self.no_id = tokenizer.convert_tokens_to_ids("no")
        if tokenizer.unk_token_id in (self.yes_id, self.no_id):
            raise ValueError("the VQA model's tokenizer has no single token for 'yes' or 'no'")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_VQA_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BlipYesProbability:
        """A BLIP VQA checkpoint by Hub name or local folder (safetensors only)."""
        from transformers import BlipForQuestionAnswering, BlipProcessor

        processor = BlipProcessor.from_pretrained(name_or_path)
        model = BlipForQuestionAnswering.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
        return cls(model.to(device).eval(), processor)

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image], questions: Sequence[str]) -> list[float]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        if not images:
            return []
        parameter = next(self.model.parameters())
        inputs = self.processor(
            images=[image.convert("RGB") for image in images], text=list(questions), return_tensors="pt", padding=True
        )
        pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        input_ids = inputs["input_ids"].to(parameter.device)
        attention_mask = inputs["attention_mask"].to(parameter.device)
        image_embeds = self.model.vision_model(pixel_values=pixel_values)[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question_embeds = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=False,
        )[0]
        start = torch.full((len(images), 1), self.model.decoder_start_token_id, device=question_embeds.device)
        logits = self.model.text_decoder(
            input_ids=start,
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=attention_mask,
            return_dict=True,
        ).logits[:, -1, :]
        probabilities = logits.float().softmax(dim=-1)
        yes, no = probabilities[:, self.yes_id], probabilities[:, self.no_id]
        return (yes / (yes + no)).cpu().tolist()


class BlipVqaScorer:
    """The attribute-binding score of images of one prompt (colour, shape, texture; complex's attribute part)."""

    def __init__(self, vqa: YesProbability, parser: PhraseParser) -> None:
        self.vqa = vqa
        self.parser = parser

    def questions(self, prompt: str) -> list[str]:
        return [question_for(phrase) for phrase in self.parser.noun_phrases(prompt)]

    def __call__(self, images: Sequence[PIL.Image.Image], prompt: str) -> list[dict]:
        """Per image: ``score`` and ``details`` (each question with its "yes" probability)."""
        questions = self.questions(prompt)
        pairs = [(image, question) for image in images for question in questions]
        answers = self.vqa([image for image, _ in pairs], [question for _, question in pairs])
        results = []
        for index in range(len(images)):
            mine = answers[index * len(questions) : (index + 1) * len(questions)]
            results.append(
                {"score": attribute_binding_score(mine), "details": {"questions": dict(zip(questions, mine))}}
            )
        return results
