"""A judge for shapes-world images that needs no learned model.

It finds the shapes by palette segmentation and classifies them by rules, then checks a
prompt's requirements: the named objects are present, each colour sits on the right shape,
counts are exact (and nothing extra is drawn), and the relation holds by T2I-CompBench's
centre rule.

Segmentation models every pixel as a blend of the background and one palette colour,
``p = bg + α·(c − bg)``: the colour with the smallest residual wins, and the pixel is
foreground when its ``α ≥ 0.5``. Anti-aliased edges and a blurry decoder produce exactly such
blends, so they land on the right colour instead of on whichever palette entry happens to be
nearest in RGB (a grey white-on-dark edge is nearer to purple than to white).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from .data import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    PromptSpec,
    caption_for,
    parse_prompt,
    relation_holds,
)

MIN_AREA = 20
TRIANGLE_TOP_FRACTION = 0.4
SQUARE_FILL = 0.88


@dataclass
class Detection:
    """One found shape: colour, shape, pixel bbox ``(x0, y0, x1, y1)`` (ends exclusive), mask."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    area: int
    center: tuple[float, float]
    mask: np.ndarray = field(repr=False)
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    """The judge's answer for one image and prompt.

    ``objects_present``: every named shape is found often enough, whatever its colour.
    ``binding_correct``: every named (colour, shape) pairing is found at least once.
    ``count_correct``: every group is found exactly ``count`` times and nothing else is drawn.
    ``relation_correct``: some subject-object pair satisfies the relation; ``None`` without one.
    ``passed``: all of the above.
    """

    prompt: str
    objects_present: bool
    binding_correct: bool
    count_correct: bool
    relation_correct: bool | None
    passed: bool
    detections: list[Detection]
    reasons: list[str]

    def as_dict(self) -> dict:
        """JSON-ready summary (detections without their masks)."""
        return {
            "prompt": self.prompt,
            "objects_present": self.objects_present,
            "binding_correct": self.binding_correct,
            "count_correct": self.count_correct,
            "relation_correct": self.relation_correct,
            "passed": self.passed,
            "detections": [{"colour": d.colour, "shape": d.shape, "bbox": list(d.bbox)} for d in self.detections],
            "reasons": self.reasons,
        }


def _to_array(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """float RGB array ``(H, W, 3)`` in 0..255, resized to the world's 64 px if needed."""
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        if array.max() <= 1.0:
            array = array * 255.0
        image = PIL.Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def palette_labels(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """Per-pixel palette index into ``COLOURS`` (``-1`` for background) by the blend model."""
    pixels = _to_array(image) - np.asarray(BACKGROUND, dtype=np.float32)
    directions = np.stack([np.asarray(PALETTE[c], dtype=np.float32) for c in COLOURS]) - np.asarray(BACKGROUND)
    alpha = np.einsum("hwc,kc->hwk", pixels, directions) / (directions**2).sum(-1)
    alpha = np.clip(alpha, 0.0, 1.5)
    residual = np.linalg.norm(pixels[:, :, None, :] - alpha[..., None] * directions, axis=-1)
    best = residual.argmin(-1)
    coverage = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    return np.where(coverage >= 0.5, best, -1)


def _neighbour_counts(mask: np.ndarray) -> np.ndarray:
    """How many of the 3×3 neighbourhood (the pixel included) are set."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def clean_labels(labels: np.ndarray) -> np.ndarray:
    """3×3 mode filter: removes speckles and one-pixel fringes that a decoder leaves between colours."""
    candidates = np.arange(-1, len(COLOURS))
    counts = np.stack([_neighbour_counts(labels == k) for k in candidates])
    own = np.take_along_axis(counts, (labels + 1)[None], 0)[0]
    # Keep a pixel's own label unless it is nearly isolated, so thin triangle tips survive.
    return np.where(own >= 3, labels, candidates[counts.argmax(0)])


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, by iterated max-propagation of pixel ids."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        grown = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return [labels == value for value in np.unique(labels) if value != 0]


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Fill ratio of the bbox, share of the area in the bbox's upper half, aspect ratio."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(len(ys))
    fill = area / float((y1 - y0) * (x1 - x0))
    # Pixel rows straddling the middle count half to each side, so odd heights are unbiased.
    middle = (y0 + y1) / 2
    top = np.clip(middle - ys, 0.0, 1.0).sum() / area
    return {"fill": fill, "top_fraction": float(top), "aspect": float((x1 - x0) / (y1 - y0))}


def classify_shape(features: dict[str, float]) -> str:
    """Rules read off rendered shapes: an upright triangle keeps a quarter of its area in its upper
    half (circles and squares half); a square fills its bbox (a circle π/4 of it)."""
    if features["top_fraction"] < TRIANGLE_TOP_FRACTION:
        return "triangle"
    return "square" if features["fill"] >= SQUARE_FILL else "circle"


def detect(image: PIL.Image.Image | np.ndarray, min_area: int = MIN_AREA) -> list[Detection]:
    """Find the coloured shapes in ``image``, largest first."""
    labels = clean_labels(palette_labels(image))
    detections = []
    for index, colour in enumerate(COLOURS):
        for component in connected_components(labels == index):
            area = int(component.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(component)
            features = shape_features(component)
            detections.append(
                Detection(
                    colour=colour,
                    shape=classify_shape(features),
                    bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                    area=area,
                    center=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                    mask=component,
                    features=features,
                )
            )
    return sorted(detections, key=lambda d: -d.area)


def evaluate(detections: list[Detection], spec: PromptSpec, prompt: str = "") -> Verdict:
    """Score ``detections`` against ``spec``."""
    reasons = []
    matches = [[d for d in detections if (d.colour, d.shape) == (g.colour, g.shape)] for g in spec.groups]

    needed_per_shape = {shape: sum(g.count for g in spec.groups if g.shape == shape) for shape in SHAPES}
    found_per_shape = {shape: sum(d.shape == shape for d in detections) for shape in SHAPES}
    objects_present = all(found_per_shape[s] >= n for s, n in needed_per_shape.items())
    if not objects_present:
        reasons.append(f"shapes found {found_per_shape}, needed {needed_per_shape}")

    binding_correct = all(matches)
    for group, found in zip(spec.groups, matches):
        if not found:
            reasons.append(f"no {group.colour} {group.shape}")

    exact = all(len(found) == group.count for group, found in zip(spec.groups, matches))
    extra = len(detections) - spec.num_objects
    count_correct = exact and extra == 0
    if not exact:
        reasons.append(
            "counts " + ", ".join(f"{g.colour} {g.shape}: {len(m)}/{g.count}" for g, m in zip(spec.groups, matches))
        )
    elif extra:
        reasons.append(f"{extra} object(s) not asked for")

    relation_correct = None
    if spec.relation is not None:
        relation = spec.relation
        relation_correct = any(
            relation_holds(s.center, relation.predicate, o.center)
            for s in matches[relation.subject]
            for o in matches[relation.object]
        )
        if not relation_correct:
            reasons.append(f"relation '{relation.predicate}' not satisfied")

    passed = objects_present and binding_correct and count_correct and relation_correct is not False
    return Verdict(
        prompt, objects_present, binding_correct, count_correct, relation_correct, passed, detections, reasons
    )


def judge(image: PIL.Image.Image | np.ndarray, prompt: str | PromptSpec) -> Verdict:
    """Judge one image against a shapes-world prompt (a caption string or a ``PromptSpec``)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    text = prompt if isinstance(prompt, str) else caption_for(spec)
    return evaluate(detect(image), spec, text)


def named_object_masks(detections: list[Detection], prompt: str | PromptSpec) -> list[np.ndarray | None]:
    """Each object group of ``prompt``: the union of the detections with its colour and its shape, ``None``
    where none was found (the group is not drawn)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    masks = []
    for group in spec.groups:
        found = [d.mask for d in detections if d.colour == group.colour and d.shape == group.shape]
        masks.append(np.any(found, axis=0) if found else None)
    return masks
