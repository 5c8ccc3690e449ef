"""T2I-CompBench's 2-D spatial score (its ``UniDet_eval/2D_spatial_eval.py``), as pure functions.

The official script detects objects with UniDet; this package detects the two named objects with Grounding
DINO instead (``scorers.detector``), and both feed the same rule:

1. the relation is the first of ``SPATIAL_VOCABULARY`` found in the prompt (as a substring);
2. each named object's box is its best detection; with both found, the score is
   ``0.25 * s1 + 0.25 * s2 + position_score / 2`` (``s`` the detection confidences); with one found,
   ``0.25 * s``; with none, 0;
3. a score below 0.5 becomes 0.

``position_score`` compares box centres (pixels, image y downwards): "on the left of" needs the first object's
centre left of the second's, further apart horizontally than vertically, and scores 1 if the boxes' IoU is
under 0.1, else ``0.1 / IoU``; "next to", "near" and "on side of" score 1 if the centres are within 150 px
horizontally or vertically, else ``150 / max(|dx|, |dy|)``. As in the official script, "on top of" is found by
step 1 but has no rule in step 2 (only "on the top of" has), so its position score is 0.
"""

from __future__ import annotations

from ..grounding.base import BoxDetection

# The official vocabulary, in the order it is searched.
SPATIAL_VOCABULARY: tuple[str, ...] = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
NEARBY_RELATIONS = ("next to", "on side of", "near")
IOU_THRESHOLD = 0.1
DISTANCE_THRESHOLD = 150.0
SCORE_FLOOR = 0.5


def find_relation(prompt: str) -> str | None:
    """The first word group of ``SPATIAL_VOCABULARY`` contained in ``prompt``, or ``None``."""
    return next((word for word in SPATIAL_VOCABULARY if word in prompt), None)


def box_iou(box1: tuple[float, float, float, float], box2: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for two empty boxes)."""
    width = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    height = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    intersection = width * height
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - intersection
    return intersection / union if union > 0 else 0.0


def position_score(
    relation: str | None,
    box1: tuple[float, float, float, float],
    box2: tuple[float, float, float, float],
    iou_threshold: float = IOU_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
) -> float:
    """How well ``box1`` (the first object) stands in ``relation`` to ``box2``, in [0, 1] (rule in the module doc)."""
    dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
    dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
    if relation in NEARBY_RELATIONS:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    # The direction from object 1 to object 2 each relation needs, and along which axis it must dominate.
    needs = {
        "on the left of": (dx > 0, abs(dx) > abs(dy)),
        "on the right of": (dx < 0, abs(dx) > abs(dy)),
        "on the top of": (dy > 0, abs(dy) > abs(dx)),
        "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
    }
    if relation not in needs:
        return 0.0  # includes "on top of", as in the official script
    direction, dominant = needs[relation]
    if not (direction and dominant):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(relation: str | None, first: BoxDetection | None, second: BoxDetection | None) -> float:
    """The official combination of detection confidences and ``position_score``, with its 0.5 floor."""
    if first is not None and second is not None:
        score = 0.25 * first.score + 0.25 * second.score + position_score(relation, first.box, second.box) / 2
    elif first is not None:
        score = 0.25 * first.score
    elif second is not None:
        score = 0.25 * second.score
    else:
        score = 0.0
    return 0.0 if score < SCORE_FLOOR else score
