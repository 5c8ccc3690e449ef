"""T2I-CompBench's 3-in-1 score for complex prompts (its ``3_in_1_eval/3_in_1.py``).

Each complex prompt is listed as holding a spatial relation (``complex_val_spatial.txt``), an action
(``complex_val_action.txt``), or, listed in neither, both. Its image's score averages the attribute score
(BLIP-VQA over its noun phrases) with the spatial score (spatial rule, complex object reading) for spatial
prompts, with the action score (CLIPScore of the prompt without adjectives) for action prompts, and with
both for the rest. Prompts are matched as the official script matches them: up to the first full stop,
lower case. The lists are packaged for the ``val`` split only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

import PIL.Image

from .blip_vqa import BlipVqaScorer
from .clip_score import ClipScorer
from .detector import SpatialScorer

COMPLEX_SUBCATEGORIES = ("spatial", "action", "spatial+action")


def _key(prompt: str) -> str:
    return prompt.strip().split(".")[0].lower()


@cache
def _listed(name: str) -> frozenset[str]:
    text = files("realign_pipeline.compbench").joinpath("data", f"complex_val_{name}.txt").read_text("utf-8")
    return frozenset(_key(line) for line in text.splitlines() if line.strip())


def complex_subcategory(prompt: str) -> str:
    """``"spatial"``, ``"action"`` or ``"spatial+action"``, from the official sub-lists of the val split."""
    key = _key(prompt)
    if key in _listed("spatial"):
        return "spatial"
    if key in _listed("action"):
        return "action"
    return "spatial+action"


def three_in_one_score(subcategory: str, attribute: float, spatial: float, action: float) -> float:
    """The official combination: the mean of the attribute score and the scores of the prompt's relations."""
    if subcategory == "spatial":
        return (attribute + spatial) / 2
    if subcategory == "action":
        return (attribute + action) / 2
    if subcategory == "spatial+action":
        return (attribute + spatial + action) / 3
    raise ValueError(f"subcategory must be one of {COMPLEX_SUBCATEGORIES}, got {subcategory!r}")


class ComplexScorer:
    """3-in-1 scores of images of one complex prompt; every part is computed and kept in ``details``."""

    def __init__(self, attribute: BlipVqaScorer, spatial: SpatialScorer, action: ClipScorer) -> None:
        if not spatial.complex_mode or not action.complex_mode:
            raise ValueError("the complex score needs the spatial and CLIP scorers in complex mode")
        self.attribute = attribute
        self.spatial = spatial
        self.action = action

    def __call__(self, images: Sequence[PIL.Image.Image], prompt: str) -> list[dict]:
        subcategory = complex_subcategory(prompt)
        parts = zip(self.attribute(images, prompt), self.spatial(images, prompt), self.action(images, prompt))
        return [
            {
                "score": three_in_one_score(subcategory, a["score"], s["score"], c["score"]),
                "details": {
                    "subcategory": subcategory,
                    "attribute": a["score"],
                    "spatial": s["score"],
                    "action": c["score"],
                    "questions": a["details"]["questions"],
                    "objects": s["details"]["objects"],
                },
            }
            for a, s, c in parts
        ]
