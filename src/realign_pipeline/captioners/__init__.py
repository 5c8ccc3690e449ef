"""Captioners: BLIP / BLIP-2 image captions, caption-derived tags, and LLM local (dense) captions.

The rule-based ``PromptPhraseCaptioner`` lives in the pipeline file (it needs no model) and is
re-exported from ``realign_pipeline``.
"""

from .blip import (
    CAPTION_STOP_WORDS,
    BlipImageCaptioner,
    CaptionTagger,
    ImageCaptioner,
    ImageTagger,
    resolve_dtype,
    tags_from_caption,
)
from .llm import (
    DEFAULT_TEMPLATE,
    LOCAL_CAPTION_SCHEMA,
    LLMDenseCaptioner,
    LLMFallbackWarning,
    words_not_in_prompt,
)

__all__ = [
    "CAPTION_STOP_WORDS",
    "DEFAULT_TEMPLATE",
    "LLMDenseCaptioner",
    "LLMFallbackWarning",
    "LOCAL_CAPTION_SCHEMA",
    "BlipImageCaptioner",
    "CaptionTagger",
    "ImageCaptioner",
    "ImageTagger",
    "resolve_dtype",
    "tags_from_caption",
    "words_not_in_prompt",
]
