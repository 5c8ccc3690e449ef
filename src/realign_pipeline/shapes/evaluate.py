"""The judged evaluation table: RealignDiff's ablation on the shapes world.

Each row of the table is a configuration: which UNet draws (the base one, or a caption-reward
fine-tuned one saved as an extra subfolder of the world folder) and whether the fine pass
re-weights attention, with masks from the coarse pass's attention maps, from a grounder on the
coarse image (as RealignDiff grounds with Grounding DINO + SAM), or with the true masks of a
layout that satisfies the prompt (the upper bound on mask quality). Each column is a category
of held-out (or seen) evaluation prompts, scored by the rule-based judge: accuracy is
the share of images that pass every check, with a 95% Wilson score interval.

Each prompt is drawn with ``seeds`` seeds (4 by default), and every configuration draws the same prompts
from the same initial noise: the initial latents of seed ``s`` of a prompt come from a generator seeded by
``(seed, category, prompt index, s)`` alone (``initial_noise``) and are handed to the pipeline as
``latents``, so they depend neither on the configuration nor on the batching, and rows differ only by what
they configure. Because the rows share their noise, two rows are compared image by image: the second
table gives, for named pairs of rows (``default_pairs``), the difference in strict pass rate with a paired
95% interval over prompts (``paired_difference``), which accounts for the seeds of one prompt not being
independent draws.

Held-out means held out: the ``held_out`` and ``seen`` splits are the final tables' prompts and nothing
else in the project reads them; choices (weights, settings) are made on the ``development`` splits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from tqdm.auto import tqdm

from ..options import select_named
from ..pipeline_realign_diff import Layout, RealignDiffPipeline
from .data import (
    EVAL_CATEGORIES,
    EVAL_PROMPTS_PER_CATEGORY,
    PROMPT_SPLITS,
    evaluation_prompts,
    phrase_for,
    render_scene,
    scene_for_prompt,
)
from .grounder import ShapesGrounder
from .judge import Verdict, judge

BASE_UNET = "unet"
# Fine-tuned UNets live beside the base one in the world folder; ``realign_pipeline.shapes.finetune`` writes them.
FINETUNED_UNETS: tuple[str, ...] = ("unet-refl", "unet-ranked")
FINETUNE_COMMAND = "python -m realign_pipeline.shapes.finetune"
MASK_SOURCES: tuple[str, ...] = ("attention", "grounder", "true")
# The final tables use the evaluation splits ("held_out", "seen"); the development splits are for choosing settings.
SPLITS: tuple[str, ...] = PROMPT_SPLITS
DEFAULT_BATCH_SIZE = 16
# Seeds per prompt: issue [F] asks for at least 4, so that a prompt's result is not one draw of its noise.
DEFAULT_SEEDS = 4
CONTACT_SHEET_COLUMNS = 8
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
HTML_FILE = "report.html"


@dataclass(frozen=True)
class EvalConfiguration:
    """One row of the table: a UNet (a subfolder of the world folder) and how the fine pass gets masks.

    ``masks``: ``"attention"`` (the pipeline's own grounder, masks read from the coarse pass's
    cross-attention maps), ``"grounder"`` (``ShapesGrounder`` on the coarse image, the world's
    stand-in for Grounding DINO + SAM, which RealignDiff uses), ``"true"`` (the rendered masks of a
    layout satisfying the prompt, given as ``regions``, so there is no coarse pass) or ``None``
    with ``realign=False``.
    """

    name: str
    description: str
    unet_subfolder: str = BASE_UNET
    realign: bool = False
    masks: Literal["attention", "grounder", "true"] | None = None

    def __post_init__(self) -> None:
        if self.realign and self.masks not in MASK_SOURCES:
            raise ValueError(f"configuration {self.name!r}: masks must be one of {MASK_SOURCES} when realign=True")
        if not self.realign and self.masks is not None:
            raise ValueError(f"configuration {self.name!r}: masks={self.masks!r} needs realign=True")
        if not self.unet_subfolder or Path(self.unet_subfolder).name != self.unet_subfolder:
            raise ValueError(f"configuration {self.name!r}: unet_subfolder must be a folder name, not a path")


def default_configurations(full_unet: str = "unet-refl") -> list[EvalConfiguration]:
    """The ablation rows, in table order; ``full_unet`` is the fine-tuned UNet of the ``full`` rows."""
    if full_unet not in FINETUNED_UNETS:
        raise ValueError(f"full_unet must be one of {FINETUNED_UNETS}, got {full_unet!r}")
    grounded = "re-weighting with grounded masks (shapes grounder on the coarse image)"
    return [
        EvalConfiguration("base", "base UNet, plain Stable Diffusion", BASE_UNET),
        EvalConfiguration(
            "reweight-attention", "base UNet, re-weighting with attention-map masks", BASE_UNET, True, "attention"
        ),
        EvalConfiguration("reweight-grounded", f"base UNet, {grounded}", BASE_UNET, True, "grounder"),
        EvalConfiguration(
            "reweight-true-masks", "base UNet, re-weighting with true masks (upper bound)", BASE_UNET, True, "true"
        ),
        EvalConfiguration("refl", "ReFL fine-tuned UNet, plain", "unet-refl"),
        EvalConfiguration("ranked", "reward-ranked fine-tuned UNet, plain", "unet-ranked"),
        EvalConfiguration("full", f"{full_unet} + {grounded} (RealignDiff)", full_unet, True, "grounder"),
        EvalConfiguration(
            "full-attention", f"{full_unet} + re-weighting with attention-map masks", full_unet, True, "attention"
        ),
    ]


CONFIGURATION_NAMES: tuple[str, ...] = tuple(configuration.name for configuration in default_configurations())


def select_configurations(names: Sequence[str] | None = None, full_unet: str = "unet-refl") -> list[EvalConfiguration]:
    """The default configurations named in ``names`` (all of them if ``None``), in the order given."""
    available = {configuration.name: configuration for configuration in default_configurations(full_unet)}
    return select_named(CONFIGURATION_NAMES if names is None else names, available)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a binomial proportion ``successes / n``.

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at
    0 or ``n`` successes, which matters for the small counts of this table.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp away rounding error at the ends (the exact bounds at 0 and n successes are 0 and 1).
    return max(0.0, center - half_width), min(1.0, center + half_width)


def student_t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student t quantile: ``t`` with ``P(|T| <= t) = confidence`` for ``df`` degrees of freedom.

    For integer ``df`` the distribution function is a finite series in ``theta = atan(t / sqrt(df))``
    (Abramowitz & Stegun 26.7.3-26.7.4), increasing in ``theta`` on ``[0, pi/2)``; it is inverted by bisection
    to float precision. (scipy is not a dependency of the package.)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    df = int(df)

    def two_sided_probability(theta: float) -> float:
        cos, sin = math.cos(theta), math.sin(theta)
        if df % 2:  # odd: (2/pi) [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))]
            term, total = cos, 0.0
            for j in range((df - 1) // 2):
                if j:
                    term *= cos * cos * (2 * j) / (2 * j + 1)
                total += term
            return 2 / math.pi * (theta + sin * total)
        # even: sin [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
        term, total = 1.0, 0.0
        for j in range(df // 2):
            if j:
                term *= cos * cos * (2 * j - 1) / (2 * j)
            total += term
        return sin * total

    low, high = 0.0, math.pi / 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if two_sided_probability(middle) < confidence else (low, middle)
    return math.sqrt(df) * math.tan((low + high) / 2)


@dataclass(frozen=True)
class PairedDifference:
    """A difference in pass rate between two rows over the same images, with its paired interval.

    ``difference``, ``low`` and ``high`` are fractions (0.1 = 10 points); ``low`` and ``high`` are NaN when
    there is a single prompt (no spread between prompts to estimate).
    """

    difference: float
    low: float
    high: float
    prompts: int
    images: int

    def as_dict(self) -> dict:
        return {
            "difference": self.difference,
            "ci95": [None if math.isnan(self.low) else self.low, None if math.isnan(self.high) else self.high],
            "prompts": self.prompts,
            "images": self.images,
        }


def paired_difference(
    first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]], confidence: float = 0.95
) -> PairedDifference:
    """Difference of two rows' pass rates over the same images, with an interval that treats prompts as clusters.

    ``first[p][s]`` and ``second[p][s]``: whether seed ``s`` of prompt ``p`` passed under each row; both rows drew
    that image from the same noise. Each prompt gives one paired difference ``d_p = mean_s(first - second)``; the
    difference is ``mean_p d_p`` (the difference of the pooled pass rates, every prompt having the same number
    of seeds) and the interval is ``mean_p d_p +- t * sd(d_p) / sqrt(P)`` with ``t`` the two-sided Student
    quantile for ``P - 1`` degrees of freedom, clipped to [-1, 1] (a difference of two rates lies there, so the
    clipped interval covers whenever the unclipped one does; with few prompts ``t`` is large and it matters).

    Why this interval: the seeds of one prompt share its difficulty, so its images are not independent draws
    and an interval over images would be too narrow; the prompts are the independent units. Pairing (the same
    image in both rows) removes what the rows share, and averaging over a prompt's seeds first gives one
    number per cluster, the standard cluster-level analysis for equal cluster sizes (Donner & Klar 2000);
    ``d_p`` lies in [-1, 1], so with the table's hundreds of prompts the t interval's normal approximation is
    sound. Unlike a cluster bootstrap it is deterministic, so a table is reproduced exactly. Its limits: with
    every ``d_p`` equal (e.g. two rows drawing identical images) it shrinks to a point, and a single prompt
    gives no interval (NaN bounds).
    """
    if len(first) != len(second):
        raise ValueError(f"first has {len(first)} prompts, second {len(second)}: the rows must share their prompts")
    if not first:
        raise ValueError("no prompts to compare")
    seeds = {len(row) for row in (*first, *second)}
    if len(seeds) != 1 or 0 in seeds:
        raise ValueError(f"every prompt must have the same positive number of seeds in both rows, got {sorted(seeds)}")
    per_prompt = np.array(
        [np.mean(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) for a, b in zip(first, second)]
    )
    prompts = len(per_prompt)
    difference = float(per_prompt.mean())
    if prompts == 1:
        low = high = math.nan
    else:
        half_width = student_t_quantile(confidence, prompts - 1) * float(per_prompt.std(ddof=1)) / math.sqrt(prompts)
        low, high = max(-1.0, difference - half_width), min(1.0, difference + half_width)
    return PairedDifference(difference, low, high, prompts, prompts * seeds.pop())


def true_mask_regions(prompt: str, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """``regions`` for the pipeline from a rendered layout that satisfies ``prompt``.

    One region per object group, captioned with the group's phrase ("two red circles") and masked
    by the union of its objects' masks, so a counted group claims all of its objects.
    """
    scene = scene_for_prompt(prompt, rng)
    _, masks = render_scene(scene)
    regions = []
    for index, group in enumerate(scene.spec.groups):
        members = [k for k, obj in enumerate(scene.objects) if obj.group == index]
        regions.append((phrase_for(group), masks[members].any(axis=0)))
    return regions


def evaluation_prompt_sets(
    split: str = "held_out", prompts_per_category: int = EVAL_PROMPTS_PER_CATEGORY
) -> dict[str, list[str]]:
    """The table's prompts: ``evaluation_prompts(category, split, n, seed=0)`` for each of ``EVAL_CATEGORIES``.

    A category may hold fewer prompts than asked for (there are only so many held-out counts).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if prompts_per_category <= 0:
        raise ValueError(f"prompts_per_category must be positive, got {prompts_per_category}")
    return {
        category: evaluation_prompts(category, split, n=prompts_per_category, seed=0) for category in EVAL_CATEGORIES
    }


def check_world(world: str | Path, configurations: Sequence[EvalConfiguration]) -> None:
    """Raise ``FileNotFoundError`` naming every UNet subfolder the configurations need but ``world`` lacks."""
    world = Path(world)
    if not (world / "model_index.json").is_file():
        raise FileNotFoundError(f"{world} is not a diffusers pipeline folder (no model_index.json)")
    needed = list(dict.fromkeys(configuration.unet_subfolder for configuration in configurations))
    missing = [name for name in needed if not (world / name / "config.json").is_file()]
    if missing:
        # Name the rows that need each folder, so the message also says what to leave out instead.
        details = "; ".join(
            f"{world / name} (needed by {', '.join(c.name for c in configurations if c.unet_subfolder == name)})"
            for name in missing
        )
        raise FileNotFoundError(
            f"missing UNet folder(s): {details}. The fine-tuned UNets ({', '.join(FINETUNED_UNETS)}) are made by "
            f"`{FINETUNE_COMMAND}`; run it first, or leave those configurations out."
        )


@dataclass(frozen=True)
class EvalSettings:
    """How every configuration generates: the same prompts, seeds per prompt, steps, guidance and noise."""

    split: str = "held_out"
    prompts_per_category: int = EVAL_PROMPTS_PER_CATEGORY
    seeds: int = DEFAULT_SEEDS
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    coarse_stop_fraction: float = 0.3
    # The re-weighting rows' strengths, the pipeline's defaults (DenseDiffusion's) unless a world's own were
    # chosen on the development split.
    cross_attention_weight: float = 1.0
    self_attention_weight: float = 0.3
    modulation_fraction: float = 0.3
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for name in ("prompts_per_category", "seeds", "num_inference_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.coarse_stop_fraction <= 1:
            raise ValueError(f"coarse_stop_fraction must be in (0, 1], got {self.coarse_stop_fraction}")
        for name in ("guidance_scale", "cross_attention_weight", "self_attention_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.modulation_fraction <= 1:
            raise ValueError(f"modulation_fraction must be in [0, 1], got {self.modulation_fraction}")


@dataclass
class CategoryResult:
    """Judged images of one category under one configuration.

    Counts, not rates, are stored so that categories pool exactly. ``seconds`` is the wall time of
    generation alone (the pipeline calls), without the judge or the building of true masks.
    """

    category: str
    n: int
    passed: int
    objects_present: int
    binding_correct: int
    count_correct: int
    relation_correct: int | None
    seconds: float
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.passed / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval of ``accuracy``."""
        return wilson_interval(self.passed, self.n)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.n

    def as_dict(self) -> dict:
        """JSON-ready: counts, rates, interval, timing and one record per prompt."""
        low, high = self.interval
        return {
            "category": self.category,
            "n": self.n,
            "passed": self.passed,
            "accuracy": self.accuracy,
            "ci95": [low, high],
            "objects_present_rate": self.objects_present / self.n,
            "binding_correct_rate": self.binding_correct / self.n,
            "count_correct_rate": self.count_correct / self.n,
            "relation_correct_rate": None if self.relation_correct is None else self.relation_correct / self.n,
            "generation_seconds": self.seconds,
            "seconds_per_image": self.seconds_per_image,
            "records": self.records,
        }


@dataclass
class ConfigurationResult:
    """One row: per-category results, pooled totals, and the first images of each category."""

    configuration: EvalConfiguration
    categories: dict[str, CategoryResult]
    samples: dict[str, list[tuple[PIL.Image.Image, bool]]] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return sum(result.n for result in self.categories.values())

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.categories.values())

    @property
    def accuracy(self) -> float:
        return self.passed / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval of the accuracy pooled over categories."""
        return wilson_interval(self.passed, self.n)

    @property
    def seconds_per_image(self) -> float:
        return sum(result.seconds for result in self.categories.values()) / self.n

    def as_dict(self) -> dict:
        low, high = self.interval
        return {
            "configuration": asdict(self.configuration),
            "categories": {name: result.as_dict() for name, result in self.categories.items()},
            "all": {
                "n": self.n,
                "passed": self.passed,
                "accuracy": self.accuracy,
                "ci95": [low, high],
                "seconds_per_image": self.seconds_per_image,
            },
        }


def load_pipeline(world: str | Path, unet_subfolder: str = BASE_UNET, device: str = "cpu") -> RealignDiffPipeline:
    """The world's pipeline with the UNet of ``unet_subfolder``, in float32, progress bars off."""
    # Always through ``realign_unet`` (also for the base UNet), so every row loads its UNet the same way.
    pipe = RealignDiffPipeline.from_pretrained(
        world, realign_unet=world, realign_unet_subfolder=unet_subfolder, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def samples_of(num_prompts: int, seeds: int) -> list[tuple[int, int]]:
    """The images of a category, in order: ``(prompt index, seed index)``, all seeds of a prompt together."""
    return [(index, seed_index) for index in range(num_prompts) for seed_index in range(seeds)]


def _batches(
    prompt_sets: dict[str, list[str]], batch_size: int, seeds: int = 1
) -> list[tuple[int, str, list[tuple[int, int]]]]:
    """``(category position, category, (prompt index, seed index) of each image)`` per batch.

    Batches never mix categories, so each category's generation time is measured on its own.
    """
    batches = []
    for position, (category, prompts) in enumerate(prompt_sets.items()):
        samples = samples_of(len(prompts), seeds)
        batches += [
            (position, category, samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)
        ]
    return batches


def _record(verdict: Verdict, layout: Layout | None, sample: tuple[int, int]) -> dict:
    """One image's verdict, with its ``(prompt index, seed index)``; with re-weighting, also the regions used and
    dropped (e.g. empty attention masks)."""
    record = {
        "prompt": verdict.prompt,
        "prompt_index": sample[0],
        "seed_index": sample[1],
        "passed": verdict.passed,
        "objects_present": verdict.objects_present,
        "binding_correct": verdict.binding_correct,
        "count_correct": verdict.count_correct,
        "relation_correct": verdict.relation_correct,
        "reasons": verdict.reasons,
    }
    if layout is not None:
        record["regions"] = [region.caption for region in layout.regions]
        record["dropped_regions"] = [{"caption": d.caption, "reason": d.reason} for d in layout.dropped]
    return record


def initial_noise(
    seed: int, category_position: int, index: int, shape: Sequence[int], seed_index: int = 0
) -> torch.Tensor:
    """The initial latents (before the scheduler's ``init_noise_sigma``) of seed ``seed_index`` of prompt ``index``
    of the category at ``category_position``: standard normal noise of ``shape`` from a generator seeded by the
    four numbers alone, so every configuration, batch size and device starts that image from the same point.

    Seed index 0 is the stream of the earlier one-seed tables: ``SeedSequence`` pads its entropy with zero words
    to its pool of 4, so ``[seed, category, index, 0]`` and ``[seed, category, index]`` are the same sequence.
    """
    if seed_index < 0:
        raise ValueError(f"seed_index must be >= 0, got {seed_index}")
    # One 32-bit word: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed anyway.
    words = [seed, category_position, index, seed_index]
    generator_seed = int(np.random.SeedSequence(words).generate_state(1)[0])
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(generator_seed))


def latent_shape(pipe: RealignDiffPipeline) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image's latents at the pipeline's default resolution."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return pipe.unet.config.in_channels, height, width


def category_result(
    category: str,
    verdicts: Sequence[Verdict],
    seconds: float,
    layouts: Sequence[Layout | None] | None = None,
    samples: Sequence[tuple[int, int]] | None = None,
) -> CategoryResult:
    """Count the judge's verdicts of one category: an image passes only if its verdict passes every check
    (objects present, binding, exact counts with nothing extra, the relation where there is one).

    ``samples``: each verdict's ``(prompt index, seed index)``; by default each verdict is its own prompt's
    only seed, ``(k, 0)``.
    """
    if not verdicts:
        raise ValueError(f"category {category!r}: no verdicts to count")
    layouts = [None] * len(verdicts) if layouts is None else list(layouts)
    if len(layouts) != len(verdicts):
        raise ValueError(f"category {category!r}: {len(layouts)} layouts for {len(verdicts)} verdicts")
    samples = [(k, 0) for k in range(len(verdicts))] if samples is None else list(samples)
    if len(samples) != len(verdicts):
        raise ValueError(f"category {category!r}: {len(samples)} samples for {len(verdicts)} verdicts")
    if len(set(samples)) != len(samples):
        raise ValueError(f"category {category!r}: a (prompt index, seed index) appears more than once")
    has_relation = any(verdict.relation_correct is not None for verdict in verdicts)
    return CategoryResult(
        category=category,
        n=len(verdicts),
        passed=sum(v.passed for v in verdicts),
        objects_present=sum(v.objects_present for v in verdicts),
        binding_correct=sum(v.binding_correct for v in verdicts),
        count_correct=sum(v.count_correct for v in verdicts),
        relation_correct=sum(bool(v.relation_correct) for v in verdicts) if has_relation else None,
        seconds=seconds,
        records=[_record(verdict, layout, sample) for verdict, layout, sample in zip(verdicts, layouts, samples)],
    )


def run_configuration(
    pipe: RealignDiffPipeline,
    configuration: EvalConfiguration,
    prompt_sets: dict[str, list[str]],
    settings: EvalSettings,
    on_batch: Callable[[], None] | None = None,
) -> ConfigurationResult:
    """Generate every prompt ``settings.seeds`` times with ``configuration`` (``pipe`` must hold its UNet) and
    judge the images.

    Seed ``s`` of a prompt starts from ``initial_noise(settings.seed, category position, prompt index, shape, s)``:
    the same noise for the same image in every configuration, whatever the batching; with true masks, its layout
    comes from ``np.random.default_rng([settings.seed, category position, prompt index, s])``. Any other randomness
    of a batch ``b`` (counted over all categories) comes from ``torch.Generator().manual_seed(settings.seed + b)``.
    ``on_batch`` is called after each batch (for a progress bar).
    """
    shape = latent_shape(pipe)
    images_by_category: dict[str, list[PIL.Image.Image]] = {category: [] for category in prompt_sets}
    layouts_by_category: dict[str, list[Layout | None]] = {category: [] for category in prompt_sets}
    seconds = dict.fromkeys(prompt_sets, 0.0)
    batches = _batches(prompt_sets, settings.batch_size, settings.seeds)
    for batch_index, (position, category, samples) in enumerate(batches):
        prompts = [prompt_sets[category][index] for index, _ in samples]
        regions = None
        if configuration.masks == "true":
            # A layout per image from its own seeded stream, so its masks do not depend on batching.
            regions = [
                true_mask_regions(
                    prompt_sets[category][index], np.random.default_rng([settings.seed, position, index, s])
                )
                for index, s in samples
            ]
        latents = torch.stack(
            [initial_noise(settings.seed, position, index, shape, seed_index) for index, seed_index in samples]
        )
        started = time.perf_counter()
        output = pipe(
            prompts,
            latents=latents.to(settings.device),
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=torch.Generator().manual_seed(settings.seed + batch_index),
            realign=configuration.realign,
            regions=regions,
            grounder=ShapesGrounder() if configuration.masks == "grounder" else None,
            coarse_stop_fraction=settings.coarse_stop_fraction,
            cross_attention_weight=settings.cross_attention_weight,
            self_attention_weight=settings.self_attention_weight,
            modulation_fraction=settings.modulation_fraction,
        )
        seconds[category] += time.perf_counter() - started
        images_by_category[category].extend(output.images)
        layouts_by_category[category].extend(output.layouts or [None] * len(prompts))
        if on_batch is not None:
            on_batch()

    categories: dict[str, CategoryResult] = {}
    contact: dict[str, list[tuple[PIL.Image.Image, bool]]] = {}
    for category, prompts in prompt_sets.items():
        samples = samples_of(len(prompts), settings.seeds)
        images = images_by_category[category]
        verdicts = [judge(image, prompts[index]) for image, (index, _) in zip(images, samples)]
        categories[category] = category_result(
            category, verdicts, seconds[category], layouts_by_category[category], samples
        )
        # The contact sheet shows seed 0 of the first prompts (then further seeds if there are fewer prompts).
        shown = sorted(range(len(samples)), key=lambda k: (samples[k][1], samples[k][0]))[:CONTACT_SHEET_COLUMNS]
        contact[category] = [(images[k], verdicts[k].passed) for k in shown]
    return ConfigurationResult(configuration, categories, contact)


def checkpoint_key(world: str | Path, configuration: EvalConfiguration, settings: EvalSettings) -> dict:
    """What a row's images depend on: the configuration, the settings (the batch size aside: each image's noise
    is its own) and the SHA-256 of every file of its UNet folder, so a retrained UNet is not taken for the old."""
    unet = Path(world) / configuration.unet_subfolder
    digests = {
        path.relative_to(unet).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(unet.rglob("*"))
        if path.is_file()
    }
    return {
        "configuration": asdict(configuration),
        "settings": {name: value for name, value in asdict(settings).items() if name != "batch_size"},
        "unet_files": digests,
    }


def save_checkpoint(folder: str | Path, result: ConfigurationResult, key: dict) -> Path:
    """Write a finished row to ``folder``: ``<name>.json`` (its key, counts, records) and its contact-sheet
    images as PNGs; the JSON is written last, through a temporary file, so a killed run leaves no half row."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = result.configuration.name
    samples = {}
    for category, images in result.samples.items():
        samples[category] = []
        for k, (image, passed) in enumerate(images):
            image_name = f"{name}-{category}-{k}.png"
            image.save(folder / image_name)
            samples[category].append({"image": image_name, "passed": passed})
    state = {
        "key": key,
        "categories": {category: asdict(r) for category, r in result.categories.items()},
        "samples": samples,
    }
    path = folder / f"{name}.json"
    partial = folder / f"{name}.json.partial"
    partial.write_text(json.dumps(state) + "\n")
    partial.replace(path)
    return path


def load_checkpoint(folder: str | Path, configuration: EvalConfiguration, key: dict) -> ConfigurationResult | None:
    """The row saved by ``save_checkpoint`` if its key is ``key``; ``None`` if there is none or it was made
    with other settings, another configuration or another UNet."""
    path = Path(folder) / f"{configuration.name}.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["key"] != json.loads(json.dumps(key)):  # compare as JSON (tuples become lists)
        return None
    categories = {category: CategoryResult(**fields) for category, fields in state["categories"].items()}
    samples = {
        category: [(PIL.Image.open(Path(folder) / s["image"]).convert("RGB"), s["passed"]) for s in images]
        for category, images in state["samples"].items()
    }
    return ConfigurationResult(configuration, categories, samples)


def run_evaluation(
    world: str | Path,
    configurations: Sequence[EvalConfiguration],
    settings: EvalSettings | None = None,
    progress: bool = True,
    checkpoints: str | Path | None = None,
) -> list[ConfigurationResult]:
    """Run every configuration on the split's prompts; results come back in the order of ``configurations``.

    The world folder is checked first, so a missing fine-tuned UNet fails before anything is
    generated. Each distinct UNet subfolder is loaded once and serves all rows that use it.
    With ``checkpoints`` (a folder), each finished row is saved there and a row already saved with the same
    ``checkpoint_key`` is read back instead of generated, so a killed run resumes at the row it was in.
    """
    settings = settings or EvalSettings()
    check_world(world, configurations)
    prompt_sets = evaluation_prompt_sets(settings.split, settings.prompts_per_category)
    batches_per_configuration = len(_batches(prompt_sets, settings.batch_size, settings.seeds))
    results: dict[str, ConfigurationResult] = {}
    keys = {c.name: checkpoint_key(world, c, settings) for c in configurations} if checkpoints is not None else {}
    if checkpoints is not None:
        for configuration in configurations:
            saved = load_checkpoint(checkpoints, configuration, keys[configuration.name])
            if saved is not None:
                results[configuration.name] = saved
    with tqdm(
        total=batches_per_configuration * len(configurations),
        initial=batches_per_configuration * len(results),
        desc="realign eval",
        unit="batch",
        disable=not progress,
    ) as bar:
        for unet_subfolder in dict.fromkeys(configuration.unet_subfolder for configuration in configurations):
            rows = [c for c in configurations if c.unet_subfolder == unet_subfolder and c.name not in results]
            if not rows:
                continue  # every row of this UNet was read back from its checkpoint
            pipe = load_pipeline(world, unet_subfolder, settings.device)
            for configuration in rows:
                bar.set_postfix_str(configuration.name)
                result = run_configuration(pipe, configuration, prompt_sets, settings, on_batch=lambda: bar.update(1))
                if checkpoints is not None:
                    save_checkpoint(checkpoints, result, keys[configuration.name])
                results[configuration.name] = result
            del pipe  # the next UNet's pipeline replaces it rather than sitting beside it
    return [results[configuration.name] for configuration in configurations]


def _percent_with_interval(accuracy: float, interval: tuple[float, float]) -> str:
    return f"{100 * accuracy:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def format_table(results: Sequence[ConfigurationResult]) -> str:
    """Markdown table: one row per configuration; accuracy (%) with its 95% Wilson interval per
    category and pooled over categories ("all"), then generation seconds per image."""
    if not results:
        raise ValueError("no results to format")
    categories = list(results[0].categories)
    header = (
        ["configuration", "UNet", "re-weighting"]
        + [f"{category} (n={results[0].categories[category].n})" for category in categories]
        + [f"all (n={results[0].n})", "s/image"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        configuration = result.configuration
        reweighting = f"{configuration.masks} masks" if configuration.realign else "off"
        cells = [configuration.name, configuration.unet_subfolder, reweighting]
        cells += [
            _percent_with_interval(result.categories[c].accuracy, result.categories[c].interval) for c in categories
        ]
        cells += [_percent_with_interval(result.accuracy, result.interval), f"{result.seconds_per_image:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The one check each category is about, for the second table: T2I-CompBench scores these alone.
CATEGORY_CRITERIA: dict[str, str] = {
    "binding": "binding_correct",
    "relation": "relation_correct",
    "count": "count_correct",
}


def format_criteria_table(results: Sequence[ConfigurationResult]) -> str:
    """Markdown table of each category's own check alone (``CATEGORY_CRITERIA``), with 95% Wilson intervals.

    "passed" needs every check at once (objects, binding, exact counts with nothing extra, relation);
    this table shows which check a configuration moves: colours on the right shapes for binding
    prompts, the relation for relation prompts, exact counts for count prompts.
    """
    if not results:
        raise ValueError("no results to format")
    categories = [c for c in results[0].categories if c in CATEGORY_CRITERIA]
    header = ["configuration"] + [
        f"{category}: {CATEGORY_CRITERIA[category].replace('_', ' ')} (n={results[0].categories[category].n})"
        for category in categories
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result.configuration.name]
        for category in categories:
            category_result = result.categories[category]
            successes = getattr(category_result, CATEGORY_CRITERIA[category]) or 0
            cells.append(
                _percent_with_interval(successes / category_result.n, wilson_interval(successes, category_result.n))
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ConfigurationPair:
    """Two rows to compare image by image: ``first`` minus ``second``, and what the difference measures."""

    first: str
    second: str
    meaning: str

    @property
    def name(self) -> str:
        return f"{self.first} - {self.second}"


def default_pairs(full_unet: str = "unet-refl") -> list[ConfigurationPair]:
    """The paired comparisons of the second table, in order; ``full_unet`` is the UNet of the ``full`` rows, so
    "full minus the same UNet plain" is re-weighting's own contribution over the fine-tuned UNet."""
    plain_full = {"unet-refl": "refl", "unet-ranked": "ranked"}.get(full_unet)
    if plain_full is None:
        raise ValueError(f"full_unet must be one of {FINETUNED_UNETS}, got {full_unet!r}")
    return [
        ConfigurationPair("full", "base", "the whole method: fine-tuned UNet and grounded re-weighting"),
        ConfigurationPair("reweight-grounded", "base", "re-weighting's own contribution (grounded masks, base UNet)"),
        ConfigurationPair("full", plain_full, f"re-weighting's own contribution over the {full_unet} UNet"),
        ConfigurationPair("reweight-true-masks", "base", "re-weighting with true masks (the upper bound on masks)"),
        ConfigurationPair("reweight-attention", "base", "re-weighting with attention-map masks (base UNet)"),
        ConfigurationPair("refl", "base", "ReFL fine-tuning alone"),
        ConfigurationPair("ranked", "base", "reward-ranked fine-tuning alone"),
        ConfigurationPair("reweight-true-masks", "reweight-grounded", "what true masks add over grounded ones"),
    ]


def pairs_for(results: Sequence[ConfigurationResult]) -> list[ConfigurationPair]:
    """``default_pairs`` for the ``full`` row's UNet, keeping the pairs whose two rows are both in ``results``."""
    names = {result.configuration.name for result in results}
    full = [r.configuration.unet_subfolder for r in results if r.configuration.name == "full"]
    pairs = default_pairs(full[0] if full else FINETUNED_UNETS[0])
    return [pair for pair in pairs if pair.first in names and pair.second in names]


def pass_matrix(result: CategoryResult) -> list[list[bool]]:
    """``[prompt][seed]`` strict pass of a category's images, from its records (prompts and seeds in index order)."""
    by_sample = {(record["prompt_index"], record["seed_index"]): record["passed"] for record in result.records}
    prompts = sorted({index for index, _ in by_sample})
    seeds = sorted({seed_index for _, seed_index in by_sample})
    if len(by_sample) != len(prompts) * len(seeds) or prompts != list(range(len(prompts))):
        raise ValueError(f"category {result.category!r}: the records are not every seed of every prompt")
    return [[by_sample[(index, seed_index)] for seed_index in seeds] for index in prompts]


@dataclass(frozen=True)
class PairComparison:
    """``paired_difference`` of strict pass between the two rows of ``pair``, per category and over all prompts."""

    pair: ConfigurationPair
    categories: dict[str, PairedDifference]
    all: PairedDifference

    def as_dict(self) -> dict:
        return {
            **asdict(self.pair),
            "categories": {name: difference.as_dict() for name, difference in self.categories.items()},
            "all": self.all.as_dict(),
        }


def compare_pair(
    first: ConfigurationResult, second: ConfigurationResult, pair: ConfigurationPair | None = None
) -> PairComparison:
    """Compare two rows image by image; they must hold the same prompts and seeds (the same run's settings).

    "all" treats every prompt of every category as one cluster, so it is the difference of the pooled rates.
    """
    pair = pair or ConfigurationPair(first.configuration.name, second.configuration.name, "")
    if list(first.categories) != list(second.categories):
        raise ValueError(f"{pair.name}: the rows hold different categories")
    categories, all_first, all_second = {}, [], []
    for name, result in first.categories.items():
        other = second.categories[name]
        prompts = [(r["prompt_index"], r["seed_index"], r["prompt"]) for r in result.records]
        if sorted(prompts) != sorted((r["prompt_index"], r["seed_index"], r["prompt"]) for r in other.records):
            raise ValueError(f"{pair.name}: category {name!r} holds different prompts or seeds in the two rows")
        a, b = pass_matrix(result), pass_matrix(other)
        categories[name] = paired_difference(a, b)
        all_first += a
        all_second += b
    return PairComparison(pair, categories, paired_difference(all_first, all_second))


def paired_comparisons(
    results: Sequence[ConfigurationResult], pairs: Sequence[ConfigurationPair] | None = None
) -> list[PairComparison]:
    """``compare_pair`` for each pair (by default ``pairs_for(results)``); a pair naming a missing row is an error."""
    by_name = {result.configuration.name: result for result in results}
    pairs = pairs_for(results) if pairs is None else list(pairs)
    missing = sorted({name for pair in pairs for name in (pair.first, pair.second) if name not in by_name})
    if missing:
        raise ValueError(f"pairs name configuration(s) not in the results: {missing}")
    return [compare_pair(by_name[pair.first], by_name[pair.second], pair) for pair in pairs]


def _points_with_interval(difference: PairedDifference) -> str:
    if math.isnan(difference.low):
        return f"{100 * difference.difference:+.1f} [n/a: 1 prompt]"
    return f"{100 * difference.difference:+.1f} [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]"


def format_pairs_table(comparisons: Sequence[PairComparison]) -> str:
    """Markdown table of paired differences in strict pass rate, in points, with their 95% paired intervals
    over prompts (``paired_difference``), per category and over all prompts."""
    if not comparisons:
        raise ValueError("no comparisons to format")
    first = comparisons[0]
    categories = list(first.categories)
    header = (
        ["comparison", "what it measures"]
        + [f"{c} (prompts={first.categories[c].prompts}, images={first.categories[c].images})" for c in categories]
        + [f"all (prompts={first.all.prompts}, images={first.all.images})"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for comparison in comparisons:
        cells = [comparison.pair.name, comparison.pair.meaning]
        cells += [_points_with_interval(comparison.categories[c]) for c in categories]
        cells.append(_points_with_interval(comparison.all))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(results: Sequence[ConfigurationResult]) -> str:
    """The report's tables: accuracy per row, each category's own check, and the paired comparisons (when the
    results hold both rows of at least one of ``pairs_for``'s pairs)."""
    tables = [format_table(results), format_criteria_table(results)]
    comparisons = paired_comparisons(results)
    if comparisons:
        tables.append(format_pairs_table(comparisons))
    return "\n\n".join(tables)


def contact_sheet(result: ConfigurationResult, border: int = 2) -> PIL.Image.Image:
    """The first images of each category, one row per category; a green frame passed the judge, a red one failed."""
    rows = [(category, samples) for category, samples in result.samples.items() if samples]
    tile = max((image.width for _, samples in rows for image, _ in samples), default=64) + 2 * border
    label_width = 64
    sheet = PIL.Image.new("RGB", (label_width + tile * CONTACT_SHEET_COLUMNS, 14 + tile * max(len(rows), 1)), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    font = PIL.ImageFont.load_default()
    title = f"{result.configuration.name}: {result.configuration.description}; green = passed"
    draw.text((4, 2), title, fill="black", font=font)
    for row, (category, samples) in enumerate(rows):
        top = 14 + row * tile
        draw.text((4, top + tile // 2 - 6), category, fill="black", font=font)
        for column, (image, passed) in enumerate(samples):
            left = label_width + column * tile
            draw.rectangle(
                (left, top, left + tile - 1, top + tile - 1), fill=(40, 170, 60) if passed else (200, 40, 40)
            )
            sheet.paste(image.convert("RGB"), (left + border, top + border))
    return sheet


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("realign-pipeline", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_report(
    results: Sequence[ConfigurationResult], settings: EvalSettings, world: str | Path, output: str | Path
) -> dict[str, Path]:
    """Write ``results.json`` (settings, versions, prompt counts, results, table), ``table.md`` and one
    contact sheet PNG per configuration to ``output``; returns the paths written, by name."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = format_tables(results)
    paths: dict[str, Path] = {"json": output / RESULTS_FILE, "table": output / TABLE_FILE}
    for result in results:
        name = result.configuration.name
        paths[f"contact sheet {name}"] = output / f"contact-sheet-{name}.png"
        contact_sheet(result).save(paths[f"contact sheet {name}"])
    report = {
        "world": str(Path(world).resolve()),
        "settings": asdict(settings),
        "judge": "realign_pipeline.shapes.judge (rule-based)",
        "interval": "95% Wilson score interval over images (it treats the seeds of a prompt as independent)",
        "paired_interval": "difference in strict pass rate between two rows over the same images; 95% paired "
        "interval over prompts: per-prompt mean difference over seeds, then a Student t interval over prompts",
        "timing": "seconds_per_image is the wall time of the pipeline calls only (not the judge, not building true "
        f"masks), with {torch.get_num_threads()} torch thread(s) on {settings.device}",
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "prompts": {name: result.n // settings.seeds for name, result in results[0].categories.items()}
        if results
        else {},
        "prompts_total": results[0].n // settings.seeds if results else 0,
        "seeds_per_prompt": settings.seeds,
        "images_per_configuration": results[0].n if results else 0,
        "results": [result.as_dict() for result in results],
        "paired": [comparison.as_dict() for comparison in paired_comparisons(results)],
        "table": table,
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["table"].write_text(table + "\n")
    paths["html"] = output / HTML_FILE
    paths["html"].write_text(html_report(results, table))
    return paths


def html_report(results: Sequence[ConfigurationResult], table: str) -> str:
    """The HTML report shared with T2I-CompBench (``reports.html``): the tables, a bar chart of accuracy per
    category with 95% Wilson intervals, each configuration's contact sheet and every prompt's verdict."""
    from ..reports.html import BarSeries, bar_chart_svg, escape, html_page, html_table

    categories = list(results[0].categories) if results else []
    series = [
        BarSeries(
            r.configuration.name,
            {c: r.categories[c].accuracy for c in categories},
            {c: r.categories[c].interval for c in categories},
        )
        for r in results
    ]
    sections = [
        ("Tables", "<pre>" + escape(table) + "</pre>"),
        ("Accuracy per category", bar_chart_svg(categories, series, "share of images passing every check")),
    ]
    for r in results:
        name = r.configuration.name
        rows = [
            [
                c,
                record["prompt"],
                str(record["seed_index"]),
                "passed" if record["passed"] else "; ".join(record["reasons"]),
            ]
            for c in categories
            for record in r.categories[c].records
        ]
        sections.append(
            (
                name,
                f'<img src="contact-sheet-{escape(name)}.png" alt="contact sheet {escape(name)}">'
                "<details><summary>per-prompt verdicts</summary>"
                + html_table(["category", "prompt", "seed", "verdict"], rows)
                + "</details>",
            )
        )
    return html_page("realign eval: the shapes world", sections)
