"""Local dense captions from an LLM, given the prompt and what the coarse image shows.

RealignDiff (arXiv 2305.19599), fine stage: the coarse image is described (a global caption, and
tags from RAM), and an LLM turns the prompt plus that description into local captions, one per
object with its attributes ("a red book", "a yellow vase"), which Grounded-SAM then turns into
masks. ``LLMDenseCaptioner`` implements that step as a ``DenseCaptioner``; it reaches the LLM
through ``JsonChatClient`` (any OpenAI-compatible server), and falls back to the rule-based
``PromptPhraseCaptioner`` when the LLM's answer is unusable.

A local caption must use the prompt's own words: the pipeline places each region on the prompt
tokens of its caption's content words, and a word the prompt does not contain cannot be placed.
Answers that break this are treated like malformed ones.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image

from ..llm.client import JsonChatClient, LLMResponseError, describe_error, is_retryable
from ..pipeline_realign_diff import NON_CONTENT_WORDS, LocalCaption, PromptPhraseCaptioner
from .blip import ImageCaptioner, ImageTagger, tags_from_caption

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """\
You help a text-to-image model follow its prompt. It generated an image from the prompt below; \
an image captioner and a tagger describe what that image shows.

Prompt: {prompt}
Caption of the generated image: {caption}
Tags recognised in the generated image: {tags}

List the objects the prompt asks for, each once, as a local caption: a short noun phrase made only \
of words from the prompt, with the attributes the prompt gives that object (colour, material, shape, \
size, number), for example "a red book". Do not add objects or attributes the prompt does not mention; \
use the caption and tags only to tell which objects the prompt means. Where the prompt states where an \
object is, give a box hint [x0, y0, x1, y1] in coordinates normalised to [0, 1] (origin at the top \
left); otherwise null.

Answer in JSON: {{"objects": [{{"caption": "a red book", "box": [0.0, 0.3, 0.5, 1.0]}}, \
{{"caption": "a yellow vase", "box": null}}]}}"""

LOCAL_CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "caption": {"type": "string"},
                    "box": {
                        "type": ["array", "null"],
                        "items": {"type": "number", "minimum": 0, "maximum": 1},
                        "minItems": 4,
                        "maxItems": 4,
                    },
                },
                "required": ["caption", "box"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["objects"],
    "additionalProperties": False,
}


class LLMFallbackWarning(UserWarning):
    """The LLM gave no usable local captions; the rule-based fallback captioner was used instead."""


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (letters, digits, inner apostrophes and hyphens)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


def words_not_in_prompt(caption: str, prompt: str) -> list[str]:
    """The caption's content words (the pipeline's ``NON_CONTENT_WORDS`` excluded) missing from the prompt."""
    prompt_words = set(words(prompt))
    return [word for word in words(caption) if word not in NON_CONTENT_WORDS and word not in prompt_words]


class LLMDenseCaptioner:
    """RealignDiff's LLM step as a ``DenseCaptioner``: ``captioner(image, prompt) -> list[LocalCaption]``.

    For each call it captions the image (when ``image_captioner`` is given), takes its tags (from
    ``tagger``, or else the content words of that caption), asks the LLM for local captions with
    ``prompt_template``, and checks the answer: valid JSON, matching ``LOCAL_CAPTION_SCHEMA``, at least
    one object, every content word of every caption present in the prompt. A failing answer is asked
    for once more (a new request: the client caches only accepted answers); if that fails too, or the
    server stays unreachable after the client's retries, it warns (``LLMFallbackWarning``) and returns
    ``fallback(image, prompt)``. Accepted answers are cached on disk by the client, keyed by the
    model and the messages, that is by (prompt, caption, tags, template).

    Args:
        client: the ``JsonChatClient`` to ask.
        image_captioner: gives the global caption (``caption(images) -> list[str]``), e.g. a
            ``BlipImageCaptioner``; ``None`` asks without one.
        tagger: gives the tags (``tags(images) -> list[list[str]]``), e.g. a ``CaptionTagger``; ``None``
            uses the content words of the global caption (no second model pass), or no tags.
        prompt_template: the user message, formatted with ``str.format`` and the fields ``{prompt}``,
            ``{caption}`` (``"(none)"`` without a captioner) and ``{tags}`` (comma-separated, or
            ``"(none)"``). Literal braces are doubled. It should ask for ``LOCAL_CAPTION_SCHEMA``:
            ``{"objects": [{"caption": str, "box": [x0, y0, x1, y1] | null}]}``.
        fallback: the captioner used when the LLM fails; the rule-based ``PromptPhraseCaptioner`` by default.
    """

    def __init__(
        self,
        client: JsonChatClient,
        image_captioner: ImageCaptioner | None = None,
        tagger: ImageTagger | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        fallback: Callable[[PIL.Image.Image | None, str], Sequence[str | LocalCaption]] = PromptPhraseCaptioner(),
    ) -> None:
        try:
            prompt_template.format(prompt="", caption="", tags="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                "prompt_template takes the fields {prompt}, {caption} and {tags} only; double literal braces "
                f"({{{{ and }}}}): {error!r}"
            ) from None
        self.client = client
        self.image_captioner = image_captioner
        self.tagger = tagger
        self.prompt_template = prompt_template
        self.fallback = fallback

    def describe(self, image: PIL.Image.Image | None) -> tuple[str | None, list[str]]:
        """The image's global caption and tags (``None`` and ``[]`` for what there is no model for)."""
        if image is None:
            return None, []
        caption = self.image_captioner.caption([image])[0] if self.image_captioner is not None else None
        if self.tagger is not None:
            tags = list(self.tagger.tags([image])[0])
        else:
            tags = tags_from_caption(caption) if caption else []
        return caption, tags

    def messages(self, prompt: str, caption: str | None, tags: Sequence[str]) -> list[dict[str, str]]:
        """The chat messages sent for one prompt."""
        content = self.prompt_template.format(
            prompt=prompt, caption=caption or "(none)", tags=", ".join(tags) if tags else "(none)"
        )
        return [{"role": "user", "content": content}]

    @staticmethod
    def check_answer(answer: dict[str, Any], prompt: str) -> None:
        """Raise ``ValueError`` unless every caption is non-empty and uses only the prompt's content words."""
        problems = []
        for entry in answer["objects"]:
            caption = entry["caption"]
            if not any(word not in NON_CONTENT_WORDS for word in words(caption)):
                problems.append(f"{caption!r} names no object")
                continue
            missing = words_not_in_prompt(caption, prompt)
            if missing:
                problems.append(f"{caption!r} uses words not in the prompt: {missing}")
        if problems:
            raise ValueError("; ".join(problems))

    def __call__(self, image: PIL.Image.Image | None, prompt: str) -> list[LocalCaption]:
        caption, tags = self.describe(image)
        messages = self.messages(prompt, caption, tags)
        reason = ""
        for attempt in range(2):
            try:
                answer = self.client.complete_json(
                    messages,
                    LOCAL_CAPTION_SCHEMA,
                    schema_name="local_captions",
                    check=lambda answer: self.check_answer(answer, prompt),
                )
                return self.local_captions(answer)
            except LLMResponseError as error:
                reason = str(error)
                logger.info("Unusable LLM answer (attempt %d of 2): %s", attempt + 1, reason)
            except Exception as error:
                # The client has retried transient failures already; anything else (a wrong key,
                # an unknown model) is a configuration error and surfaces.
                if not is_retryable(error):
                    raise
                reason = f"the server failed ({describe_error(error)})"
                break
        warnings.warn(
            f"LLM local captions unusable ({reason}); using {type(self.fallback).__name__} for {prompt!r}.",
            LLMFallbackWarning,
            stacklevel=2,
        )
        phrases = self.fallback(image, prompt)
        return [item if isinstance(item, LocalCaption) else LocalCaption(item) for item in phrases]

    @staticmethod
    def local_captions(answer: dict[str, Any]) -> list[LocalCaption]:
        """An accepted answer as ``LocalCaption``s: duplicates dropped, empty boxes (x1 <= x0 or y1 <= y0) dropped."""
        captions: list[LocalCaption] = []
        seen: set[str] = set()
        for entry in answer["objects"]:
            text = " ".join(entry["caption"].split())
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            box = entry.get("box")
            if box is not None:
                x0, y0, x1, y1 = (float(v) for v in box)
                # A box is only a hint: an empty one is dropped, not a reason to reject the answer.
                box = (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
            captions.append(LocalCaption(text, box))
        return captions
