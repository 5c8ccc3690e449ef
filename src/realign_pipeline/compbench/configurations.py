"""The rows of the T2I-CompBench table: the shapes table's ablation (``shapes.evaluate``) on a real model.

``base`` is plain Stable Diffusion; ``reweight-<grounder>`` adds RealignDiff's fine pass with masks from that
grounder (``attention``: the coarse pass's attention maps; ``grounding-sam``: Grounding DINO + SAM on the
coarse image, as RealignDiff grounds); ``finetuned`` is the caption-reward fine-tuned UNet alone; ``full`` is
the fine-tuned UNet with grounded re-weighting (RealignDiff) and ``full-attention`` the same with attention
masks. The shapes table's ``reweight-true-masks`` row has no counterpart: T2I-CompBench has no true layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..options import select_named

COMPBENCH_GROUNDERS: tuple[str, ...] = ("attention", "grounding-sam")
GROUNDED_FULL = "fine-tuned UNet + re-weighting with Grounding DINO + SAM masks (RealignDiff)"


@dataclass(frozen=True)
class CompBenchConfiguration:
    """One row: which UNet draws (``"base"`` or ``"finetuned"``) and the fine pass's mask source (``None``: off)."""

    name: str
    description: str
    unet: Literal["base", "finetuned"] = "base"
    grounder: str | None = None

    def __post_init__(self) -> None:
        if self.unet not in ("base", "finetuned"):
            raise ValueError(f"configuration {self.name!r}: unet must be 'base' or 'finetuned', got {self.unet!r}")
        if self.grounder is not None and self.grounder not in COMPBENCH_GROUNDERS:
            raise ValueError(f"configuration {self.name!r}: grounder must be one of {COMPBENCH_GROUNDERS} or None")

    @property
    def realign(self) -> bool:
        return self.grounder is not None


ALL_CONFIGURATIONS: tuple[CompBenchConfiguration, ...] = (
    CompBenchConfiguration("base", "base UNet, plain Stable Diffusion"),
    CompBenchConfiguration(
        "reweight-attention",
        "base UNet, re-weighting with attention-map masks",
        "base",
        "attention",
    ),
    CompBenchConfiguration(
        "reweight-grounding-sam", "base UNet, re-weighting with Grounding DINO + SAM masks", "base", "grounding-sam"
    ),
    CompBenchConfiguration("finetuned", "caption-reward fine-tuned UNet, plain", "finetuned"),
    CompBenchConfiguration(
        "full",
        GROUNDED_FULL,
        "finetuned",
        "grounding-sam",
    ),
    CompBenchConfiguration(
        "full-attention", "fine-tuned UNet + re-weighting with attention-map masks", "finetuned", "attention"
    ),
)
COMPBENCH_CONFIGURATION_NAMES: tuple[str, ...] = tuple(c.name for c in ALL_CONFIGURATIONS)


def default_configuration_names(has_finetuned_unet: bool) -> list[str]:
    """Every row when a fine-tuned UNet is given; the base UNet's rows otherwise."""
    return [c.name for c in ALL_CONFIGURATIONS if has_finetuned_unet or c.unet == "base"]


def select_compbench_configurations(
    names: Sequence[str] | None, has_finetuned_unet: bool
) -> list[CompBenchConfiguration]:
    """The configurations named (the default set if ``None``), in the order given, checked against the run."""
    names = default_configuration_names(has_finetuned_unet) if names is None else names
    selected = select_named(names, {c.name: c for c in ALL_CONFIGURATIONS})
    needing = [c.name for c in selected if c.unet == "finetuned"]
    if needing and not has_finetuned_unet:
        raise ValueError(f"configuration(s) {needing} need a fine-tuned UNet: give --realign-unet")
    return selected
