"""Several rewards as one: a weighted sum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import ImageBatch, Reward


class WeightedSum:
    """``r = Σ_j w_j r_j`` over named rewards (FineRewards' assembled reward, as a sum).

    ``info`` holds each reward's scores under its name and its own info under ``"<name>_info"``.
    Differentiable when every part with a non-zero weight is.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None) -> None:
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward.")
        self.rewards = dict(rewards)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.rewards}
        unknown = set(weights or {}) - set(self.rewards)
        if unknown:
            raise KeyError(f"Weights given for unknown rewards {sorted(unknown)}.")

    @property
    def differentiable(self) -> bool:
        return all(getattr(self.rewards[name], "differentiable", False) for name, w in self.weights.items() if w)

    def __call__(self, images: ImageBatch, prompts: Sequence[str], **context: Any) -> tuple[torch.Tensor, dict]:
        total: torch.Tensor | None = None
        info: dict[str, Any] = {}
        for name, reward in self.rewards.items():
            scores, reward_info = reward(images, prompts, **context)
            info[name] = scores.detach().cpu()
            info[f"{name}_info"] = reward_info
            weight = self.weights[name]
            if weight == 0:
                continue
            term = weight * scores
            total = term if total is None else total + term.to(total.device)
        if total is None:
            total = torch.zeros(len(prompts))
        return total, info

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}·{name}" for name, w in self.weights.items())
        return f"WeightedSum({parts})"
