"""What a T2I-CompBench run draws: prompts, images per prompt, file names, seeds, and each process's share.

T2I-CompBench (Huang et al., NeurIPS 2023) scores 10 images per prompt of its validation split (300 prompts
per category). Its evaluation scripts read the prompt back from the file name (everything before the first
``_``) and order images by the number after the last ``_``; the 3-in-1 script assumes that number runs over
the whole category, prompt by prompt (image ``k`` of prompt ``i`` is number ``i * images_per_prompt + k``).
``image_file_name`` follows that convention, so the official scripts can score the same folders.

The unit of work is one prompt with all its images (a ``WorkItem``): shards split work items, never a
prompt's images, so every image is drawn in the same batch whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..prompts import T2I_COMPBENCH_CATEGORIES, T2I_COMPBENCH_SPLITS, t2i_compbench_prompts

# Characters that cannot stand in a file name, or that the official scripts' parsing of names would break on.
FORBIDDEN_IN_PROMPT = ("/", "\\", "_", "\0", "\n")


def image_file_name(prompt: str, index: int) -> str:
    """``{prompt}_{index:06d}.png``: the official evaluators' naming (prompt before the first ``_``)."""
    bad = [c for c in FORBIDDEN_IN_PROMPT if c in prompt]
    if bad:
        raise ValueError(f"prompt {prompt!r} holds {bad}, which cannot be put in an official image file name")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return f"{prompt}_{index:06d}.png"


def image_seed(seed: int, category: str, index: int) -> int:
    """The 32-bit seed of image ``index`` (numbered over the category) of ``category``.

    It depends on the run's ``seed``, the category's place in ``T2I_COMPBENCH_CATEGORIES`` (not in the
    categories selected) and the image number alone, so every configuration, process count, batch size and
    category subset draws the image from the same initial noise.
    """
    if category not in T2I_COMPBENCH_CATEGORIES:
        raise ValueError(f"category must be one of {list(T2I_COMPBENCH_CATEGORIES)}, got {category!r}")
    position = T2I_COMPBENCH_CATEGORIES.index(category)
    return int(np.random.SeedSequence([seed, position, index]).generate_state(1)[0])


def initial_latents(seed_word: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal latents of ``shape`` (one image, before the scheduler's ``init_noise_sigma``), drawn on
    the CPU from ``seed_word`` so that every device starts from the same numbers."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_word))


@dataclass(frozen=True)
class WorkItem:
    """One prompt of one category under one configuration, with all its images."""

    configuration: str
    category: str
    prompt_index: int
    prompt: str
    images_per_prompt: int
    seed: int

    @property
    def image_indices(self) -> list[int]:
        """The images' numbers over the category: ``prompt_index * images_per_prompt + k``."""
        first = self.prompt_index * self.images_per_prompt
        return list(range(first, first + self.images_per_prompt))

    @property
    def file_names(self) -> list[str]:
        return [image_file_name(self.prompt, index) for index in self.image_indices]

    @property
    def seeds(self) -> list[int]:
        return [image_seed(self.seed, self.category, index) for index in self.image_indices]

    @property
    def key(self) -> str:
        """``configuration/category/prompt_index``: where its images and scores are kept."""
        return f"{self.configuration}/{self.category}/{self.prompt_index:04d}"


def check_categories(categories: Sequence[str]) -> list[str]:
    """``categories`` as a list, after checking each is a T2I-CompBench category and none repeats."""
    categories = list(categories)
    unknown = [c for c in categories if c not in T2I_COMPBENCH_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {list(T2I_COMPBENCH_CATEGORIES)}")
    if not categories:
        raise ValueError("no categories selected")
    repeated = sorted({c for c in categories if categories.count(c) > 1})
    if repeated:
        raise ValueError(f"categories named more than once: {repeated}")
    return categories


def category_prompts(
    categories: Sequence[str], split: str = "val", prompts_per_category: int | None = None
) -> dict[str, list[str]]:
    """Each category's packaged prompts of ``split`` (all of them by default, 300 in ``val``), checked for names."""
    if split not in T2I_COMPBENCH_SPLITS:
        raise ValueError(f"split must be one of {list(T2I_COMPBENCH_SPLITS)}, got {split!r}")
    if prompts_per_category is not None and prompts_per_category <= 0:
        raise ValueError(f"prompts_per_category must be positive, got {prompts_per_category}")
    prompts = {}
    for category in check_categories(categories):
        listed = t2i_compbench_prompts(category, split)
        prompts[category] = listed if prompts_per_category is None else listed[:prompts_per_category]
        for prompt in prompts[category]:
            image_file_name(prompt, 0)  # every prompt must make a valid file name, before anything runs
    return prompts


def plan_work(
    configurations: Sequence[str], prompts: dict[str, list[str]], images_per_prompt: int, seed: int
) -> list[WorkItem]:
    """Every work item of the run, configuration by configuration, category by category, prompt by prompt."""
    if images_per_prompt <= 0:
        raise ValueError(f"images_per_prompt must be positive, got {images_per_prompt}")
    return [
        WorkItem(configuration, category, index, prompt, images_per_prompt, seed)
        for configuration in configurations
        for category, listed in prompts.items()
        for index, prompt in enumerate(listed)
    ]


def shard(items: Sequence[WorkItem], process_index: int, num_processes: int) -> list[WorkItem]:
    """Process ``process_index``'s share of ``items``: every ``num_processes``-th item from its own offset.

    The shares are disjoint and together hold every item; interleaving spreads each configuration's work
    over all processes, so no process is left with only the slowest configuration.
    """
    if num_processes <= 0:
        raise ValueError(f"num_processes must be positive, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    return list(items[process_index::num_processes])
