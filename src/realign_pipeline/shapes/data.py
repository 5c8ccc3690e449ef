"""The shapes world: procedural 64×64 scenes of coloured shapes, their captions and true masks.

Everything here is a pure function of its arguments (randomness comes in as a seeded
``numpy.random.Generator``), so a sample is fully determined by ``(seed, index)``.

Captions follow T2I-CompBench's phrasing: "a red circle and a blue square", "a green triangle
on the left of a yellow circle", "two red circles and a blue square". A fixed list of
colour-shape pairings (``HELD_OUT_PAIRS``) never appears in training scenes; evaluation prompts
that use them measure compositional generalisation (binding a colour the model knows to a
shape it knows, in a pairing it has never seen).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 64

BACKGROUND: tuple[int, int, int] = (30, 30, 34)

# Six colours whose directions from the background are far apart, so a pixel blended with the
# background (anti-aliased edges, a blurry decoder) is still assigned to the right colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 100, 235),
    "yellow": (240, 210, 50),
    "purple": (150, 70, 200),
    "white": (235, 235, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

# Every shape is held out with at least one colour and every colour keeps at least two shapes,
# so each word is well learned and only the pairing is new.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

RELATIONS: tuple[str, ...] = ("on the left of", "on the right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
CATEGORIES: tuple[str, ...] = ("single", "binding", "relation", "count")
EVAL_CATEGORIES: tuple[str, ...] = ("binding", "relation", "count")
# Training mixture: multi-object scenes dominate because binding, relations and counts are what
# the world is for.
CATEGORY_WEIGHTS: dict[str, float] = {"single": 0.15, "binding": 0.35, "relation": 0.3, "count": 0.2}

MIN_SIZE, MAX_SIZE = 13, 21
BORDER = 2
MIN_GAP = 4
SUPERSAMPLE = 4

# Every word a caption can contain; tokenizers for the world are built from this list.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "one", "two", "three", "and", ","]
        + [word for relation in RELATIONS for word in relation.split()]
        + list(COLOURS)
        + list(SHAPES)
        + list(PLURALS.values())
    )
)


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one colour and shape, as named in a prompt ("two red circles")."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class RelationSpec:
    """``groups[subject]`` is ``predicate`` ``groups[object]`` (indices into ``PromptSpec.groups``)."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: object groups in caption order and an optional relation."""

    groups: tuple[ObjectGroup, ...]
    relation: RelationSpec | None = None

    @property
    def category(self) -> str:
        """ "relation", "count", "binding" (several single objects) or "single"."""
        if self.relation is not None:
            return "relation"
        if any(group.count > 1 for group in self.groups):
            return "count"
        return "binding" if len(self.groups) > 1 else "single"

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pairings the prompt names."""
        return tuple((group.colour, group.shape) for group in self.groups)

    @property
    def num_objects(self) -> int:
        return sum(group.count for group in self.groups)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: pixel bbox ``(x0, y0, x1, y1)``, ends exclusive; ``group`` indexes the spec."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    group: int = 0

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class Scene:
    """A layout with its caption: the structured metadata of one sample."""

    spec: PromptSpec
    objects: tuple[ShapeObject, ...]
    caption: str

    @property
    def category(self) -> str:
        return self.spec.category


@dataclass
class Sample:
    """A rendered scene: RGB image, one boolean mask per object (same order as ``scene.objects``)."""

    image: PIL.Image.Image
    masks: np.ndarray
    scene: Scene
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# captions


def phrase_for(group: ObjectGroup) -> str:
    """ "a red circle", "two red circles"."""
    noun = group.shape if group.count == 1 else PLURALS[group.shape]
    return f"{NUMBER_WORDS[group.count]} {group.colour} {noun}"


def caption_for(spec: PromptSpec) -> str:
    """The canonical caption of ``spec`` (the inverse of ``parse_prompt``)."""
    phrases = [phrase_for(group) for group in spec.groups]
    if spec.relation is not None:
        relation = spec.relation
        return f"{phrases[relation.subject]} {relation.predicate} {phrases[relation.object]}"
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(r"^(a|an|one|two|three)\s+(\w+)\s+(\w+)$")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _parse_phrase(phrase: str) -> ObjectGroup:
    match = _PHRASE.match(phrase.strip())
    if match is None:
        raise ValueError(f"not a shapes-world phrase: {phrase!r}")
    number, colour, noun = match.groups()
    shape = _SINGULAR.get(noun, noun)
    if colour not in PALETTE or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in {phrase!r}")
    return ObjectGroup(colour, shape, _COUNTS[number])


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a shapes-world prompt back into a ``PromptSpec``; raises ``ValueError`` on anything else."""
    text = " ".join(prompt.lower().replace(",", " , ").split()).removesuffix(".").strip()
    for predicate in RELATIONS:
        marker = f" {predicate} "
        if marker in text:
            left, right = text.split(marker, 1)
            groups = (_parse_phrase(left), _parse_phrase(right))
            return PromptSpec(groups, RelationSpec(0, predicate, 1))
    phrases = [part for part in re.split(r"\s+,\s+|\s+and\s+", text) if part.strip()]
    return PromptSpec(tuple(_parse_phrase(phrase) for phrase in phrases))


# ---------------------------------------------------------------------------------------------
# layouts


def relation_holds(subject_center: Sequence[float], predicate: str, object_center: Sequence[float]) -> bool:
    """T2I-CompBench's spatial rule: the relation's axis dominates the centre offset and has its sign."""
    dx = object_center[0] - subject_center[0]
    dy = object_center[1] - subject_center[1]
    if predicate == "on the left of":
        return dx > 0 and abs(dx) > abs(dy)
    if predicate == "on the right of":
        return dx < 0 and abs(dx) > abs(dy)
    if predicate == "above":
        return dy > 0 and abs(dy) > abs(dx)
    if predicate == "below":
        return dy < 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {predicate!r}")


def _clear_relation(subject: ShapeObject, predicate: str, obj: ShapeObject) -> bool:
    """A relation with margin, so that rendered scenes are unambiguous for any reasonable judge."""
    dx = obj.center[0] - subject.center[0]
    dy = obj.center[1] - subject.center[1]
    primary, secondary = (dx, dy) if predicate in ("on the left of", "on the right of") else (dy, dx)
    sign = -1 if predicate in ("on the right of", "below") else 1
    return sign * primary >= 10 and abs(primary) >= 1.5 * abs(secondary)


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0] or a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1]


def sample_layout(spec: PromptSpec, rng: np.random.Generator, max_tries: int = 2000) -> tuple[ShapeObject, ...]:
    """Place the objects of ``spec`` without overlap, satisfying its relation with a clear margin."""
    wanted = [(index, group) for index, group in enumerate(spec.groups) for _ in range(group.count)]
    for _ in range(max_tries):
        objects: list[ShapeObject] = []
        for index, group in wanted:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x0 = int(rng.integers(BORDER, IMAGE_SIZE - BORDER - size + 1))
            y0 = int(rng.integers(BORDER, IMAGE_SIZE - BORDER - size + 1))
            bbox = (x0, y0, x0 + size, y0 + size)
            if not all(_separated(bbox, other.bbox) for other in objects):
                break
            objects.append(ShapeObject(group.colour, group.shape, bbox, index))
        else:
            relation = spec.relation
            if relation is None:
                return tuple(objects)
            subjects = [o for o in objects if o.group == relation.subject]
            targets = [o for o in objects if o.group == relation.object]
            if all(_clear_relation(s, relation.predicate, t) for s in subjects for t in targets):
                return tuple(objects)
    raise RuntimeError(f"could not place {caption_for(spec)!r} in {max_tries} tries")


def sample_spec(rng: np.random.Generator, category: str, pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS) -> PromptSpec:
    """Draw a prompt spec of ``category`` whose colour-shape pairings all come from ``pairs``."""

    def distinct(k: int) -> list[tuple[str, str]]:
        return [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]

    if category == "single":
        return PromptSpec((ObjectGroup(*distinct(1)[0]),))
    if category == "binding":
        count = 2 if rng.random() < 0.7 else 3
        return PromptSpec(tuple(ObjectGroup(*pair) for pair in distinct(count)))
    if category == "relation":
        groups = tuple(ObjectGroup(*pair) for pair in distinct(2))
        return PromptSpec(groups, RelationSpec(0, RELATIONS[int(rng.integers(len(RELATIONS)))], 1))
    if category == "count":
        first, second = distinct(2)
        count = int(rng.integers(2, 4))
        groups = [ObjectGroup(*first, count)]
        if count == 2 and rng.random() < 0.5:
            groups.append(ObjectGroup(*second))
            if rng.random() < 0.5:
                groups.reverse()
        return PromptSpec(tuple(groups))
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def sample_scene(
    rng: np.random.Generator,
    category: str | None = None,
    pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS,
) -> Scene:
    """Draw a scene: a category (from ``CATEGORY_WEIGHTS`` unless given), a spec, a layout, a caption."""
    if category is None:
        weights = np.array(list(CATEGORY_WEIGHTS.values()))
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights / weights.sum()))]
    spec = sample_spec(rng, category, pairs)
    return Scene(spec, sample_layout(spec, rng), caption_for(spec))


def scene_for_prompt(prompt: str | PromptSpec, rng: np.random.Generator) -> Scene:
    """A layout that satisfies ``prompt``: true masks for any prompt (the re-weighting upper bound)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    caption = prompt if isinstance(prompt, str) else caption_for(spec)
    return Scene(spec, sample_layout(spec, rng), caption)


# ---------------------------------------------------------------------------------------------
# rendering


def shape_alpha(shape: str, bbox: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of one shape, anti-aliased by drawing at ``SUPERSAMPLE``× and box-filtering."""
    s = SUPERSAMPLE
    canvas = PIL.Image.new("L", (size * s, size * s), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in bbox)
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = canvas.resize((size, size), PIL.Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> tuple[PIL.Image.Image, np.ndarray]:
    """Draw ``scene``: returns the RGB image and boolean masks ``(num_objects, size, size)``."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for index, obj in enumerate(scene.objects):
        alpha = shape_alpha(obj.shape, obj.bbox, size)[..., None]
        image = image * (1 - alpha) + np.asarray(PALETTE[obj.colour], dtype=np.float32) * alpha
        masks[index] = alpha[..., 0] >= 0.5
    return PIL.Image.fromarray(np.round(image).astype(np.uint8)), masks


def scene_metadata(scene: Scene) -> dict:
    """JSON-ready description of a scene."""
    relation = scene.spec.relation
    return {
        "caption": scene.caption,
        "category": scene.category,
        "objects": [
            {"colour": o.colour, "shape": o.shape, "bbox": list(o.bbox), "group": o.group} for o in scene.objects
        ],
        "relation": None
        if relation is None
        else {"subject": relation.subject, "predicate": relation.predicate, "object": relation.object},
    }


def make_sample(seed: int, index: int, split: str = "train", category: str | None = None) -> Sample:
    """Sample ``index`` of the stream ``seed``: a pure function of its arguments.

    ``split="train"`` draws only ``TRAIN_PAIRS``; ``split="all"`` draws every pairing (for models on
    the judging side, such as the reward captioner, that are meant to know the whole world).
    """
    pairs = {"train": TRAIN_PAIRS, "all": ALL_PAIRS, "held_out": tuple(sorted(HELD_OUT_PAIRS))}[split]
    rng = np.random.default_rng([seed, index, {"train": 0, "all": 1, "held_out": 2}[split]])
    scene = sample_scene(rng, category, pairs)
    image, masks = render_scene(scene)
    return Sample(image, masks, scene, scene_metadata(scene))


def train_samples(seed: int, start: int = 0, split: str = "train") -> Iterator[Sample]:
    """The endless stream ``make_sample(seed, start), make_sample(seed, start + 1), ...``."""
    for index in itertools.count(start):
        yield make_sample(seed, index, split)


# ---------------------------------------------------------------------------------------------
# evaluation prompts


def _candidate_specs(category: str, pairs: Sequence[tuple[str, str]], must_use: frozenset) -> list[PromptSpec]:
    """All specs of ``category`` over ``pairs`` naming at least one pairing in ``must_use`` (if given)."""
    candidates: list[PromptSpec] = []
    if category == "single":
        candidates = [PromptSpec((ObjectGroup(*pair),)) for pair in pairs]
    elif category in ("binding", "relation"):
        for first, second in itertools.permutations(pairs, 2):
            groups = (ObjectGroup(*first), ObjectGroup(*second))
            if category == "binding":
                candidates.append(PromptSpec(groups))
            else:
                candidates += [PromptSpec(groups, RelationSpec(0, predicate, 1)) for predicate in RELATIONS]
    elif category == "count":
        for pair in pairs:
            candidates += [PromptSpec((ObjectGroup(*pair, count),)) for count in (2, 3)]
            for other in pairs:
                if other != pair:
                    candidates.append(PromptSpec((ObjectGroup(*pair, 2), ObjectGroup(*other))))
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if not must_use:
        return candidates
    # A count prompt is about its counted group: the pairing being counted must be the held-out one.
    if category == "count":
        return [spec for spec in candidates if spec.pairs[0] in must_use]
    return [spec for spec in candidates if must_use.intersection(spec.pairs)]


# The evaluation table's prompt sets are the first ``EVAL_PROMPTS_PER_CATEGORY`` specs of
# ``evaluation_specs(category, split, seed=0)`` for the two evaluation splits; nothing but ``realign eval`` reads them.
EVAL_PROMPTS_PER_CATEGORY = 96
EVALUATION_SPLITS: tuple[str, ...] = ("held_out", "seen")
# Development prompts, for every choice made while building the world or fine-tuning it (training-time judging,
# validation rewards, weights): a fixed set of this many per category and split, disjoint from the evaluation sets.
DEVELOPMENT_PROMPTS_PER_CATEGORY = 16
# ... but never all of a small category: this many of its non-evaluation prompts per split stay for fine-tuning
# (there are only 4 held-out and 14 seen single objects).
FINETUNE_KEEPS_PER_CATEGORY = 2
DEVELOPMENT_SPLITS: tuple[str, ...] = ("development", "development_seen")
PROMPT_SPLITS: tuple[str, ...] = EVALUATION_SPLITS + DEVELOPMENT_SPLITS


def _names_held_out_pairing(spec: PromptSpec) -> bool:
    return bool(HELD_OUT_PAIRS.intersection(spec.pairs))


def _evaluation_candidates(category: str, split: str) -> list[PromptSpec]:
    """Every spec an evaluation split can draw from, in a fixed order (before the seeded permutation)."""
    if split == "held_out":
        return _candidate_specs(category, ALL_PAIRS, HELD_OUT_PAIRS)
    return _candidate_specs(category, TRAIN_PAIRS, frozenset())


def _evaluated_specs(category: str) -> set[PromptSpec]:
    """The specs of the evaluation table in ``category`` (both evaluation splits, seed 0)."""
    evaluated: set[PromptSpec] = set()
    if category not in EVAL_CATEGORIES:
        return evaluated
    for split in EVALUATION_SPLITS:
        candidates = _evaluation_candidates(category, split)
        order = np.random.default_rng([0, CATEGORIES.index(category)]).permutation(len(candidates))
        evaluated.update(candidates[i] for i in order[:EVAL_PROMPTS_PER_CATEGORY])
    return evaluated


def _development_set(category: str, split: str) -> list[PromptSpec]:
    """The fixed development set of ``category``: ``DEVELOPMENT_PROMPTS_PER_CATEGORY`` specs that no
    evaluation split holds (fewer where that would leave fine-tuning under ``FINETUNE_KEEPS_PER_CATEGORY``).
    ``"development"`` specs name at least one held-out pairing anywhere (for counts also the uncounted
    object, since every held-out counted pairing is an evaluation prompt);
    ``"development_seen"`` specs name only pairings seen in training."""
    evaluated = _evaluated_specs(category)
    candidates = [
        spec
        for spec in _candidate_specs(category, ALL_PAIRS, frozenset())
        if spec not in evaluated and _names_held_out_pairing(spec) == (split == "development")
    ]
    # A stream of its own (not the evaluation splits' [seed, category]), fixed: the set never depends on a caller.
    order = np.random.default_rng([0, 200 + DEVELOPMENT_SPLITS.index(split), CATEGORIES.index(category)])
    size = max(0, min(DEVELOPMENT_PROMPTS_PER_CATEGORY, len(candidates) - FINETUNE_KEEPS_PER_CATEGORY))
    return [candidates[i] for i in order.permutation(len(candidates))[:size]]


def evaluation_specs(category: str, split: str = "held_out", n: int = 50, seed: int = 0) -> list[PromptSpec]:
    """Up to ``n`` distinct prompt specs of ``category``, in a fixed order given ``seed``.

    ``split="held_out"``: every prompt names at least one held-out pairing (for counts: the
    counted pairing is held out), the other objects are seen pairings. ``split="seen"``: only
    pairings seen in training. These two are the evaluation splits: their first
    ``EVAL_PROMPTS_PER_CATEGORY`` specs (seed 0) are the final table's prompts and nothing else uses them.

    ``split="development"`` (naming a held-out pairing) and ``"development_seen"`` (seen pairings only):
    a fixed set of at most ``DEVELOPMENT_PROMPTS_PER_CATEGORY`` specs per category, disjoint from the
    evaluation sets and from the fine-tuning prompts, for every choice made during development (training-time
    judging, validation, choosing weights); ``seed`` only orders it.
    """
    if split not in PROMPT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {PROMPT_SPLITS}")
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if split in DEVELOPMENT_SPLITS:
        candidates = _development_set(category, split)
    else:
        candidates = _evaluation_candidates(category, split)
    order = np.random.default_rng([seed, CATEGORIES.index(category)]).permutation(len(candidates))
    return [candidates[i] for i in order[:n]]


def evaluation_prompts(category: str, split: str = "held_out", n: int = 50, seed: int = 0) -> list[str]:
    """Captions of ``evaluation_specs``: the prompt sets of the evaluation table."""
    return [caption_for(spec) for spec in evaluation_specs(category, split, n, seed)]


def development_prompts(n_per_category: int = 12, seed: int = 0) -> list[str]:
    """``n_per_category`` development prompts of every category in ``CATEGORIES``, for validation while fine-tuning.

    Half (rounded up) from ``"development"`` (naming a held-out pairing), the rest from
    ``"development_seen"``; where the first has too few (there are only four held-out single objects), the
    second fills in (single objects have 14 development prompts in all, hence the default of 12). Raises
    ``ValueError`` if a category cannot give ``n_per_category``.
    """
    if n_per_category <= 0:
        raise ValueError(f"n_per_category must be positive, got {n_per_category}")
    prompts: list[str] = []
    for category in CATEGORIES:
        held_out = evaluation_prompts(category, "development", DEVELOPMENT_PROMPTS_PER_CATEGORY, seed)
        seen = evaluation_prompts(category, "development_seen", DEVELOPMENT_PROMPTS_PER_CATEGORY, seed)
        chosen = held_out[: (n_per_category + 1) // 2]
        chosen += seen[: n_per_category - len(chosen)]
        if len(chosen) < n_per_category:
            raise ValueError(
                f"n_per_category={n_per_category} is more than the {len(held_out) + len(seen)} development prompts "
                f"of category {category!r}"
            )
        prompts += chosen
    return prompts


def finetune_prompts(n_per_category: int = 200, seed: int = 0) -> list[str]:
    """Prompts for caption-reward fine-tuning: every category over all pairings, minus the evaluation and
    development prompts.

    As in RealignDiff (T2I-CompBench's training prompts, then its validation prompts), fine-tuning
    sees text prompts that may name held-out pairings, but never a prompt of the evaluation sets
    (``evaluation_specs(..., n=EVAL_PROMPTS_PER_CATEGORY, seed=0)`` of both evaluation splits) nor of
    the development splits (which validate the fine-tuning). The UNet has still never seen a held-out
    pairing drawn.
    """
    evaluated = {caption_for(spec) for category in CATEGORIES for spec in _evaluated_specs(category)}
    evaluated |= {
        caption_for(spec)
        for category in CATEGORIES
        for split in DEVELOPMENT_SPLITS
        for spec in _development_set(category, split)
    }
    prompts: list[str] = []
    for category in CATEGORIES:
        candidates = [caption_for(spec) for spec in _candidate_specs(category, ALL_PAIRS, frozenset())]
        candidates = [prompt for prompt in candidates if prompt not in evaluated]
        order = np.random.default_rng([seed, 100 + CATEGORIES.index(category)]).permutation(len(candidates))
        prompts += [candidates[i] for i in order[:n_per_category]]
    return prompts
