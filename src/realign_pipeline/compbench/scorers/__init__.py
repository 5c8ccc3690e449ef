"""T2I-CompBench's scorers through transformers: BLIP-VQA (attribute binding), CLIPScore (non-spatial),
Grounding DINO boxes under the official spatial rule (spatial), and the 3-in-1 combination (complex)."""

from .blip_vqa import BlipVqaScorer, BlipYesProbability, YesProbability, attribute_binding_score
from .clip_score import ClipScorer, ClipSimilarity
from .detector import SpatialScorer
from .three_in_one import ComplexScorer, complex_subcategory, three_in_one_score

__all__ = [
    "BlipVqaScorer",
    "BlipYesProbability",
    "ClipScorer",
    "ClipSimilarity",
    "ComplexScorer",
    "SpatialScorer",
    "YesProbability",
    "attribute_binding_score",
    "complex_subcategory",
    "three_in_one_score",
]
