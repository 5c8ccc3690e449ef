"""The spatial score with Grounding DINO boxes (T2I-CompBench's ``UniDet_eval/2D_spatial_eval.py`` rule).

The official script runs UniDet, a closed-vocabulary detector, over the image and looks the prompt's two
object nouns up among its class names (mapping girl/boy/man/woman to "person"); an object outside UniDet's
classes is never found. Here Grounding DINO (transformers' ``GroundingDinoForObjectDetection``) is asked for
the two nouns themselves, each getting its best box and confidence, and ``spatial.spatial_score`` applies
the official rule to them. The objects are the first and last noun of the prompt, or for complex prompts the
nouns around the spatial preposition (``PhraseParser.complex_objects``).
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image

from ...grounding.base import BoxDetector
from ..phrases import PhraseParser
from ..spatial import find_relation, spatial_score


def _box(detection) -> dict | None:
    return None if detection is None else {"box": list(detection.box), "score": detection.score}


class SpatialScorer:
    """Spatial scores of the images of one prompt."""

    def __init__(self, detector: BoxDetector, parser: PhraseParser, complex_mode: bool = False) -> None:
        self.detector = detector
        self.parser = parser
        self.complex_mode = complex_mode

    def objects(self, prompt: str) -> tuple[str, str] | None:
        """The two objects whose boxes are compared, or ``None`` (score 0) when they cannot be found."""
        if self.complex_mode:
            return self.parser.complex_objects(prompt)
        nouns = self.parser.nouns(prompt)
        return (nouns[0], nouns[-1]) if nouns else None

    def __call__(self, images: Sequence[PIL.Image.Image], prompt: str) -> list[dict]:
        relation = find_relation(prompt)
        objects = self.objects(prompt)
        results = []
        for image in images:
            if objects is None:
                results.append({"score": 0.0, "details": {"relation": relation, "objects": None}})
                continue
            first, second = self.detector(image, list(objects))
            results.append(
                {
                    "score": spatial_score(relation, first, second),
                    "details": {
                        "relation": relation,
                        "objects": list(objects),
                        "boxes": [
                            None if d is None else {"box": list(d.box), "score": d.score} for d in (first, second)
                        ],
                    },
                }
            )
        return results
