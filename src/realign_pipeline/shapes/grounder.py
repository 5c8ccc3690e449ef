"""The shapes world's grounder: its stand-in for Grounding DINO + SAM.

RealignDiff grounds each local caption in the coarse image with an open-vocabulary detector
(boxes) and SAM (masks). In the shapes world the same job is done without a learned model:
the shapes are found by the judge's palette segmentation (``judge.detect``), and each caption
takes the shapes that best match its words. Like Grounding DINO asked for "a red circle" in
an image that holds only a red square, it still returns the closest thing (the red square):
that region is exactly where the fine pass must turn the square into a circle.

It shares its detector with the judge, so its masks are as good as masks can be for this
world; the evaluation table says so next to every row that uses it.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from .data import ObjectGroup, parse_prompt
from .judge import Detection, detect

# A caption's words matched by a detection, best first: both words, then the colour, then the shape.
MATCH_TIERS: tuple[str, ...] = ("colour and shape", "colour", "shape")


def matches(detection: Detection, group: ObjectGroup, tier: str) -> bool:
    """Whether ``detection`` matches ``group`` at ``tier`` (one of ``MATCH_TIERS``)."""
    if tier == "colour and shape":
        return (detection.colour, detection.shape) == (group.colour, group.shape)
    if tier == "colour":
        return detection.colour == group.colour
    if tier == "shape":
        return detection.shape == group.shape
    raise ValueError(f"unknown tier {tier!r}; expected one of {MATCH_TIERS}")


class ShapesGrounder:
    """A ``Grounder`` for shapes-world images: one mask per caption ("a red circle", "two blue squares").

    Each caption asks for as many shapes as its number word says. Detections are handed out
    tier by tier (``MATCH_TIERS``), largest first, each to at most one caption, so two captions
    never share a shape; a caption that matches nothing gets ``None`` (the pipeline then falls
    back to its attention-map mask), as does a caption that is not a shapes-world phrase.
    """

    name = "shapes-palette"

    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[np.ndarray | None]:
        groups: list[ObjectGroup | None] = []
        for caption in captions:
            try:
                spec = parse_prompt(caption)
            except ValueError:
                groups.append(None)
                continue
            groups.append(spec.groups[0] if len(spec.groups) == 1 and spec.relation is None else None)

        detections = detect(image)
        taken = [False] * len(detections)
        assigned: list[list[Detection]] = [[] for _ in captions]
        for tier in MATCH_TIERS:
            for index, group in enumerate(groups):
                if group is None:
                    continue
                for position, detection in enumerate(detections):
                    if len(assigned[index]) >= group.count:
                        break
                    if not taken[position] and matches(detection, group, tier):
                        assigned[index].append(detection)
                        taken[position] = True

        return [np.logical_or.reduce([d.mask for d in found]) if found else None for found in assigned]
