"""Rewards by name, so a config file can list them."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .base import Reward
from .combine import WeightedSum

BUILTIN_REWARDS = ("concept_matching", "caption", "tags")


def import_object(reference: str) -> Any:
    """``"package.module:Name"`` or ``"path/to/file.py:Name"`` to the object it names."""
    module_part, _, attribute = reference.rpartition(":")
    if not module_part or not attribute:
        raise ValueError(f"Expected 'module:Name' or 'file.py:Name', got {reference!r}.")
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        spec = importlib.util.spec_from_file_location(f"_realign_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"Cannot import {path}.")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    return getattr(module, attribute)


def reward_label(spec: Mapping[str, Any]) -> str:
    """The name a reward is logged under: its ``label``, else its name (the class for ``module:Name``)."""
    return spec.get("label", spec["name"].rpartition(":")[2] if ":" in spec["name"] else spec["name"])


def check_reward_specs(specs: Sequence[Mapping[str, Any]]) -> None:
    """The ``rewards`` option, checked without building anything: each a mapping with a known ``name`` (or an
    existing ``file.py:Name``), a numeric ``weight``, and distinct labels. ``UsageError`` names the problem."""
    if not specs:
        raise UsageError("rewards must list at least one reward, e.g. [{name: concept_matching}]")
    labels: set[str] = set()
    for index, spec in enumerate(specs):
        where = f"rewards[{index}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise UsageError(f"{where} must be a mapping with a name, e.g. {{name: concept_matching}}, got {spec!r}")
        name = spec["name"]
        if name not in BUILTIN_REWARDS and ":" not in name:
            raise UsageError(
                f"{where}: unknown reward {name!r}; built in: {', '.join(BUILTIN_REWARDS)}, or 'module:Name' / "
                "'file.py:Name'"
            )
        module_part = name.rpartition(":")[0]
        if module_part.endswith(".py") and not Path(module_part).is_file():
            raise UsageError(f"{where}: no such file {module_part!r} (in {name!r})")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UsageError(f"{where}: weight must be a number, got {weight!r}")
        label = reward_label(spec)
        if label in labels:
            raise UsageError(f"{where}: two rewards are called {label!r}; give one a distinct 'label'")
        labels.add(label)


def build_reward(spec: Mapping[str, Any], device: torch.device | str = "cpu") -> Reward:
    """One reward from ``{"name": ..., <its options>}`` (``weight`` is read by ``build_rewards``).

    Names: ``concept_matching`` (option ``model``: a BLIP captioning model), ``caption`` (options
    ``captioner``, ``text_encoder``), ``tags`` (options ``captioner``: the BLIP model of the
    package's ``CaptionTagger``, or ``tagger``: ``"module:Name"`` of another tagger factory, with
    ``tagger_options``; ``llm``: keyword arguments of ``JsonChatClient``), or ``"module:Name"`` /
    ``"file.py:Name"`` of a class or factory called with the remaining options.
    """
    options = {key: value for key, value in spec.items() if key not in ("name", "weight")}
    name = spec["name"]
    if name == "concept_matching":
        from .concept_matching import ConceptMatchingReward

        model = options.pop("model", "Salesforce/blip-image-captioning-base")
        return ConceptMatchingReward.from_pretrained(model, device=device, **options)
    if name == "caption":
        from .caption import CaptionReward

        return CaptionReward.from_pretrained(device=device, **options)
    if name == "tags":
        from ..llm.client import JsonChatClient
        from .tags import TagReward

        tagger_options = options.pop("tagger_options", {})
        if "tagger" in options:
            tagger = import_object(options.pop("tagger"))(**tagger_options)
        else:
            from ..captioners.blip import CaptionTagger

            captioner = options.pop("captioner", "Salesforce/blip-image-captioning-large")
            tagger = CaptionTagger.from_pretrained(captioner, device=device, **tagger_options)
        return TagReward(tagger, JsonChatClient(**options.pop("llm", {})))
    if ":" in name:
        return import_object(name)(**options)
    raise ValueError(f"Unknown reward {name!r}; built in: {BUILTIN_REWARDS}, or give 'module:Name'.")


def build_rewards(specs: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> WeightedSum:
    """The weighted sum of the rewards a config lists; names must be unique (use ``"label"`` to rename)."""
    rewards: dict[str, Reward] = {}
    weights: dict[str, float] = {}
    for spec in specs:
        label = reward_label(spec)
        if label in rewards:
            raise ValueError(f"Two rewards are called {label!r}; give one a distinct 'label'.")
        rewards[label] = build_reward({k: v for k, v in spec.items() if k != "label"}, device=device)
        weights[label] = float(spec.get("weight", 1.0))
    return WeightedSum(rewards, weights)
