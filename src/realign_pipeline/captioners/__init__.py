"""Captioners: BLIP / BLIP-2 image captions, caption-derived tags, and LLM local (dense) captions.

The rule-based ``PromptPhraseCaptioner`` lives in the pipeline file (it needs no model) and is
re-exported from ``realign_pipeline``.
"""

from ..lazy_exports import lazy_exports

# Names load on first use (``lazy_exports``): importing the package (or its ``factory``, as ``realign --help``
# does) loads neither torch nor transformers.
_EXPORTS = {
    "BlipImageCaptioner": ".blip",
    "CAPTIONER_NAMES": ".factory",
    "CAPTION_STOP_WORDS": ".blip",
    "CaptionTagger": ".blip",
    "DEFAULT_TEMPLATE": ".llm",
    "ImageCaptioner": ".blip",
    "ImageTagger": ".blip",
    "LLMDenseCaptioner": ".llm",
    "LLMFallbackWarning": ".llm",
    "LOCAL_CAPTION_SCHEMA": ".llm",
    "check_captioner_arguments": ".factory",
    "load_captioner": ".factory",
    "resolve_dtype": ".blip",
    "tags_from_caption": ".blip",
    "words_not_in_prompt": ".llm",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
