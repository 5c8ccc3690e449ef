"""Layout control: does the fine pass put each object in the region the user gives it?

    realign eval --benchmark layout          (held-out binding prompts; --split development while developing)

The fine stage of RealignDiff (DenseDiffusion's re-weighting) is meant to steer each object into its mask.
This benchmark gives two- and three-object prompts regions of their own, generates each prompt from the same
initial noise without regions (plain: objects land where the model's prior puts them) and with them, and
asks the judge where each object was drawn:

- ``share``: the fraction of an object's pixels (the judge's detections of its colour and shape) inside its
  region; an object that was not drawn counts as 0;
- ``placed``: every object drawn, each with ``share >= PLACED_SHARE``;
- ``present``: every object drawn (colour on the right shape), wherever it is;
- ``placed when present``: ``placed`` among the images with every object drawn, plain and re-weighted apart:
  how well the re-weighting steers what the model does draw, whatever limits its drawing. The two arms count
  different images, so this row has no paired interval.

Layouts are halves (two objects: left/right and top/bottom), vertical thirds (three objects) and random
non-overlapping boxes; every assignment is also run swapped (the same masks, objects exchanged), so a model
that always draws red on the left scores at chance. A plain image is scored against the regions of every
layout it is paired with, so plain's ``placed`` rate is the chance rate of that layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .data import IMAGE_SIZE, parse_prompt, phrase_for
from .evaluate import paired_difference
from .judge import judge, named_object_masks

if TYPE_CHECKING:
    from ..pipeline_realign_diff import Layout

PLACED_SHARE = 0.7
LAYOUT_KINDS = ("halves", "thirds", "boxes")
# The built-in world's settings for layout control, chosen on the development splits (its model card, "Settings
# for layout control"). The pipeline's own defaults stay DenseDiffusion's for Stable Diffusion.
WORLD_LAYOUT_SETTINGS: Mapping[str, float] = MappingProxyType(
    {"guidance_scale": 2.0, "cross_attention_weight": 1.0, "self_attention_weight": 1.0, "modulation_fraction": 0.6}
)


@dataclass(frozen=True)
class LayoutCase:
    """One prompt with one region per object group (``phrases[i]`` gets ``masks[i]``)."""

    prompt: str
    phrases: tuple[str, ...]
    masks: tuple[np.ndarray, ...] = field(repr=False, compare=False)
    kind: str
    swapped: bool


def strip_masks(count: int, vertical: bool) -> list[np.ndarray]:
    """``count`` equal strips of the image, left to right (``vertical``) or top to bottom."""
    masks = []
    edges = np.linspace(0, IMAGE_SIZE, count + 1).round().astype(int)
    for start, stop in zip(edges[:-1], edges[1:]):
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        if vertical:
            mask[:, start:stop] = True
        else:
            mask[start:stop, :] = True
        masks.append(mask)
    return masks


def random_boxes(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` non-overlapping random square boxes, each large enough to hold one shape (at most 21 px).

    Sides are 26-34 px for two boxes and 22-28 px for three (three larger ones rarely fit in 64 px).
    """
    size = (26, 34) if count <= 2 else (22, 28)
    for _ in range(10_000):
        boxes = []
        for _ in range(count):
            side = int(rng.integers(size[0], size[1] + 1))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
            boxes.append((x, y, x + side, y + side))
        if all(
            a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        ):
            masks = []
            for x0, y0, x1, y1 in boxes:
                mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
                mask[y0:y1, x0:x1] = True
                masks.append(mask)
            return masks
    raise RuntimeError(f"could not place {count} boxes without overlap")


def layout_cases(prompts: list[str], kinds: tuple[str, ...] = LAYOUT_KINDS, seed: int = 0) -> list[LayoutCase]:
    """Every prompt (two or three object groups) under every applicable layout kind, and each swapped.

    Two groups: halves left/right and top/bottom (alternating by prompt), and random boxes. Three groups:
    vertical thirds and random boxes. "Swapped" reverses which group takes which mask.
    """
    unknown = sorted(set(kinds) - set(LAYOUT_KINDS))
    if unknown:
        raise ValueError(f"`kinds` must be among {list(LAYOUT_KINDS)}, got {unknown}.")
    cases = []
    for index, prompt in enumerate(prompts):
        groups = parse_prompt(prompt).groups
        if len(groups) not in (2, 3):
            raise ValueError(f"layout control needs prompts of two or three object groups, got {prompt!r}.")
        phrases = tuple(phrase_for(group) for group in groups)
        rng = np.random.default_rng([seed, index])
        for kind in kinds:
            if kind == "halves" and len(groups) == 2:
                masks = strip_masks(2, vertical=index % 2 == 0)
            elif kind == "thirds" and len(groups) == 3:
                masks = strip_masks(3, vertical=True)
            elif kind == "boxes":
                masks = random_boxes(len(groups), rng)
            else:
                continue
            cases.append(LayoutCase(prompt, phrases, tuple(masks), kind, swapped=False))
            cases.append(LayoutCase(prompt, phrases, tuple(reversed(masks)), kind, swapped=True))
    return cases


@dataclass
class PlacementScore:
    shares: list[float]
    placed: bool
    present: bool


def score_placement(image, case: LayoutCase) -> PlacementScore:
    """Where the judge finds each group of ``case.prompt`` in ``image``, against the case's regions."""
    found = named_object_masks(judge(image, case.prompt).detections, case.prompt)
    present = all(pixels is not None for pixels in found)
    # A missing object has no pixels in its region.
    shares = [
        0.0 if pixels is None else float(np.logical_and(pixels, region).sum() / pixels.sum())
        for pixels, region in zip(found, case.masks)
    ]
    placed = present and all(share >= PLACED_SHARE for share in shares)
    return PlacementScore(shares, placed, present)


@dataclass
class LayoutControlResult:
    """Per (case, seed) scores of the plain and the re-weighted image, with the prompt each came from."""

    plain: list[PlacementScore] = field(default_factory=list)
    realigned: list[PlacementScore] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Plain and re-weighted means of ``placed``, ``share`` and ``present``, and their paired difference
        with a 95% interval over prompts (``shapes.evaluate.paired_difference``: a prompt's cases and seeds are
        one cluster, since they share its difficulty); also per layout kind."""
        summary = {"n": len(self.plain), "prompts": len(set(self.prompts))}
        summary.update(self._metrics(range(len(self.plain))))
        summary["by_kind"] = {
            kind: {"n": self.kinds.count(kind), **self._metrics([i for i, k in enumerate(self.kinds) if k == kind])}
            for kind in dict.fromkeys(self.kinds)
        }
        return summary

    def _metrics(self, rows: Sequence[int]) -> dict:
        metrics = {}
        for metric in ("placed", "share", "present"):
            plain = {i: _metric_of(self.plain[i], metric) for i in rows}
            realigned = {i: _metric_of(self.realigned[i], metric) for i in rows}
            by_prompt: dict[str, list[int]] = {}
            for i in rows:
                by_prompt.setdefault(self.prompts[i], []).append(i)
            clusters = list(by_prompt.values())
            paired = paired_difference(
                [[realigned[i] for i in cluster] for cluster in clusters],
                [[plain[i] for i in cluster] for cluster in clusters],
            )
            metrics[metric] = {
                "plain": float(np.mean(list(plain.values()))),
                "realigned": float(np.mean(list(realigned.values()))),
                "difference": paired.difference,
                "difference_95": [paired.low, paired.high],
            }
        metrics["placed_when_present"] = {
            arm: placed_when_present([scores[i] for i in rows])
            for arm, scores in (("plain", self.plain), ("realigned", self.realigned))
        }
        return metrics


def placed_when_present(scores: Sequence[PlacementScore]) -> dict:
    """``{"rate": placed / present, "present": count}`` over ``scores`` (``rate`` ``None`` when nothing is
    present): every placed image has every object drawn, so this is the placed share of those images."""
    present = sum(score.present for score in scores)
    placed = sum(score.placed for score in scores)
    return {"rate": placed / present if present else None, "present": present}


def _metric_of(score: PlacementScore, metric: str) -> float:
    if metric == "share":
        return float(np.mean(score.shares))
    return float(getattr(score, metric))


def initial_noise(pipe, seed: int) -> torch.Tensor:
    """One image's initial latents, ``(1, C, h, w)`` for the pipeline's UNet, from a CPU generator seeded ``seed``:
    the same on every device, so a plain and a re-weighted image can start from it."""
    latent = pipe.unet.config.sample_size
    return torch.randn(
        (1, pipe.unet.config.in_channels, latent, latent), generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def run_layout_control(
    pipe,
    cases: list[LayoutCase],
    seeds: list[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    batch_size: int = 16,
    show_progress: bool = True,
    **weights: float,
) -> LayoutControlResult:
    """Generate every case × seed plain and with its regions, from the same noise, and score both.

    ``weights`` go to the pipeline (``cross_attention_weight``, ``self_attention_weight``,
    ``modulation_fraction``, ``area_weight``). A prompt's plain image is generated once per seed and
    scored against each of its cases.
    """
    result = LayoutControlResult()
    prompts = list(dict.fromkeys(case.prompt for case in cases))
    calls_per_seed = math.ceil(len(prompts) / batch_size) + math.ceil(len(cases) / batch_size)
    bar = tqdm(total=len(seeds) * calls_per_seed, desc="layout control", unit="batch", disable=not show_progress)
    for seed in seeds:
        # The noise of (prompt, seed) depends on nothing else, so plain and re-weighted images share it.
        noise = {prompt: initial_noise(pipe, seed * 100_003 + index) for index, prompt in enumerate(prompts)}
        plain_images = {}
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            images = pipe(
                batch,
                latents=torch.cat([noise[p] for p in batch]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                realign=False,
            ).images
            plain_images.update(zip(batch, images))
            bar.update(1)
        for start in range(0, len(cases), batch_size):
            batch = cases[start : start + batch_size]
            images = pipe(
                [case.prompt for case in batch],
                latents=torch.cat([noise[case.prompt] for case in batch]),
                regions=[list(zip(case.phrases, case.masks)) for case in batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                **weights,
            ).images
            for case, image in zip(batch, images):
                result.plain.append(score_placement(plain_images[case.prompt], case))
                result.realigned.append(score_placement(image, case))
                result.kinds.append(case.kind)
                result.prompts.append(case.prompt)
            bar.update(1)
    bar.close()
    return result


@dataclass
class LayoutDemo:
    """One prompt drawn plain and under each of its layouts from the same noise, each image scored."""

    cases: list[LayoutCase]
    plain_image: PIL.Image.Image
    images: list[PIL.Image.Image]  # re-weighted, one per case
    layouts: list[Layout]  # the pipeline's layout of each re-weighted image (its regions, as the panel draws them)
    plain_scores: list[PlacementScore]
    scores: list[PlacementScore]


@torch.no_grad()
def draw_layout_demo(
    pipe, prompt: str, seed: int, num_inference_steps: int = 25, guidance_scale: float = 4.0, **weights: float
) -> LayoutDemo:
    """``prompt`` (two object groups) with its objects given the left and right halves, then swapped, both from
    the noise of the plain image: what ``realign eval --benchmark layout`` measures, for one prompt and seed."""
    if len(parse_prompt(prompt).groups) != 2:
        raise ValueError(f"`prompt` must name two object groups (one per half), got {prompt!r}.")
    cases = layout_cases([prompt], kinds=("halves",))
    noise = initial_noise(pipe, seed)
    settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    plain_image = pipe([prompt], latents=noise, realign=False, **settings).images[0]
    output = pipe(
        [case.prompt for case in cases],
        latents=noise.expand(len(cases), -1, -1, -1).clone(),
        regions=[list(zip(case.phrases, case.masks)) for case in cases],
        **settings,
        **weights,
    )
    return LayoutDemo(
        cases=cases,
        plain_image=plain_image,
        images=list(output.images),
        layouts=list(output.layouts),
        plain_scores=[score_placement(plain_image, case) for case in cases],
        scores=[score_placement(image, case) for case, image in zip(cases, output.images)],
    )


def placement_note(name: str, case: LayoutCase, score: PlacementScore) -> str:
    """One line of a panel: each object's share of pixels inside its region, and whether the image counts as placed."""
    shares = ", ".join(f"{phrase} {share:.2f}" for phrase, share in zip(case.phrases, score.shares))
    verdict = "PLACED" if score.placed else ("not placed" if score.present else "not placed (an object is missing)")
    return f"judge, {name}: in-region share {shares}: {verdict}"


def layout_prompts(split: str, count: int) -> list[str]:
    """The first ``count`` binding prompts (two or three object groups) of ``split``, as ``realign eval`` takes
    them: ``"development"`` names a held-out pairing in each prompt, ``"development_seen"`` only seen ones."""
    from .data import evaluation_prompts

    return evaluation_prompts("binding", split, count)


def format_layout_table(summary: dict) -> str:
    """A Markdown table: plain and re-weighted rates, their paired difference and its 95% interval, overall and
    per layout kind."""
    lines = [
        "| layouts | n | metric | plain | re-weighted | difference [95% over prompts] |",
        "|---|---|---|---|---|---|",
    ]
    blocks = [("all", summary), *summary["by_kind"].items()]
    for name, block in blocks:
        for metric in ("placed", "share", "present"):
            row = block[metric]
            low, high = row["difference_95"]
            lines.append(
                f"| {name} | {block['n']} | {metric} | {row['plain']:.3f} | {row['realigned']:.3f} | "
                f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}] |"
            )
        arms = block["placed_when_present"]
        plain, realigned = (_rate_of(arms[arm]) for arm in ("plain", "realigned"))
        lines.append(f"| {name} | {block['n']} | placed when present | {plain} | {realigned} | (different images) |")
    return "\n".join(lines)


def _rate_of(arm: dict) -> str:
    rate = "–" if arm["rate"] is None else f"{arm['rate']:.3f}"
    return f"{rate} of {arm['present']}"
