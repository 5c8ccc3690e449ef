"""Tag reward: an LLM judges each tag recognised in the image against the prompt."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import PIL.Image
import torch

from .base import ImageBatch, check_batch, to_pil_images

Tagger = Callable[[list[PIL.Image.Image]], list[list[str]]]

TAG_SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scores": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"tag": {"type": "string"}, "score": {"type": "integer", "enum": [1, 2, 3]}},
                "required": ["tag", "score"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["scores"],
    "additionalProperties": False,
}

TAG_SCORE_INSTRUCTIONS = (
    "You judge whether an image matches the text prompt it was generated from. You get the prompt "
    "and the tags an image tagger recognised in the image. Score every tag: 3 if the prompt mentions "
    "it (same object, attribute or relation, synonyms count), 2 if it is related to the prompt's "
    "content without being mentioned (a plausible part, setting or consequence), 1 if it is unrelated. "
    'Answer with JSON: {"scores": [{"tag": <tag exactly as given>, "score": 1|2|3}, ...]}, one entry per tag.'
)


class JsonChat(Protocol):
    """The package's LLM client (``realign_pipeline.llm.client.JsonChatClient``) or any look-alike."""

    def complete_json(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]: ...


def tag_reward_value(scores: Sequence[int]) -> float:
    """FineRewards' tag reward ``r = (Σ s − 2n) / 2n`` for ``n`` tag scores ``s ∈ {1, 2, 3}``.

    It is 0.5 when every tag is in the prompt, 0 when all are merely related and −0.5 when none
    relates. An image with no recognised tag gets −0.5: nothing in it can be matched to the prompt.
    """
    if not scores:
        return -0.5
    n = len(scores)
    return (sum(scores) - 2 * n) / (2 * n)


class TagReward:
    """FineRewards' tag reward: tags of the image scored 3 / 2 / 1 by an LLM against the prompt.

    FineRewards (the assemble-reward paper RealignDiff builds on) tags the image, asks an LLM
    whether each tag is in the prompt (3), related (2) or unrelated (1), and rewards
    ``r = (Σ_i s_i − 2n) / 2n`` over the ``n`` tags. Not differentiable.

    Args:
        tagger: ``images -> tags per image``.
        llm: a ``JsonChat`` client; one request per image.
    """

    differentiable = False

    def __init__(self, tagger: Tagger | Any, llm: JsonChat, instructions: str = TAG_SCORE_INSTRUCTIONS) -> None:
        self.tagger = tagger.tags if hasattr(tagger, "tags") else tagger
        self.llm = llm
        self.instructions = instructions

    def score_tags(self, prompt: str, tags: Sequence[str]) -> list[int]:
        """The LLM's score per tag, in the order given. Tags it skipped or garbled count as 1."""
        if not tags:
            return []
        messages = [
            {"role": "system", "content": self.instructions},
            {"role": "user", "content": json.dumps({"prompt": prompt, "tags": list(tags)})},
        ]
        answer = self.llm.complete_json(messages, TAG_SCORE_SCHEMA)
        by_tag: dict[str, int] = {}
        for entry in answer.get("scores", []):
            try:
                by_tag[str(entry["tag"]).strip().lower()] = int(entry["score"])
            except (KeyError, TypeError, ValueError):
                continue
        return [min(3, max(1, by_tag.get(tag.strip().lower(), 1))) for tag in tags]

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]:
        check_batch(images, prompts)
        all_tags = [list(tags) for tags in self.tagger(to_pil_images(images))]
        all_scores = [self.score_tags(prompt, tags) for prompt, tags in zip(prompts, all_tags)]
        values = torch.tensor([tag_reward_value(scores) for scores in all_scores], dtype=torch.float32)
        return values, {"tags": all_tags, "tag_scores": all_scores}
