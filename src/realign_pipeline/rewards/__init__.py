"""Rewards for caption-reward fine-tuning and evaluation.

Each is a plain callable ``reward(images, prompts, **context) -> (scores (B,), info)``.
"""

from .attribute_concentration import (
    AttributeConcentrationReward,
    attention_share,
    attribute_concentration_loss,
    regions_from_context,
)
from .base import Reward, check_batch, to_image_tensor, to_pil_images
from .caption import CaptionReward, CLIPTextEmbedder, SentenceEmbedder
from .combine import WeightedSum
from .concept_matching import ConceptMatchingReward
from .factory import build_reward, build_rewards, import_object
from .tags import TAG_SCORE_SCHEMA, JsonChat, TagReward, tag_reward_value

__all__ = [
    "TAG_SCORE_SCHEMA",
    "AttributeConcentrationReward",
    "CLIPTextEmbedder",
    "CaptionReward",
    "ConceptMatchingReward",
    "JsonChat",
    "Reward",
    "SentenceEmbedder",
    "TagReward",
    "WeightedSum",
    "attention_share",
    "attribute_concentration_loss",
    "build_reward",
    "build_rewards",
    "check_batch",
    "import_object",
    "regions_from_context",
    "tag_reward_value",
    "to_image_tensor",
    "to_pil_images",
]
