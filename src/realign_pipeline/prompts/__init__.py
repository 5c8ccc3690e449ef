"""Prompt lists shipped with the package: T2I-CompBench's (MIT, see ``t2i_compbench/README.md``)."""

from __future__ import annotations

from importlib.resources import files

T2I_COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
T2I_COMPBENCH_SPLITS = ("train", "val")


def t2i_compbench_prompts(category: str, split: str = "val") -> list[str]:
    """The T2I-CompBench prompts of one ``category`` and ``split``, one per line, blank lines dropped.

    ``split="val"`` is the benchmark's evaluation split (300 prompts each); ``"train"`` its training split,
    the one to fine-tune on. Huang et al., "T2I-CompBench", NeurIPS 2023.
    """
    if category not in T2I_COMPBENCH_CATEGORIES:
        raise ValueError(f"`category` must be one of {list(T2I_COMPBENCH_CATEGORIES)}, got {category!r}.")
    if split not in T2I_COMPBENCH_SPLITS:
        raise ValueError(f"`split` must be one of {list(T2I_COMPBENCH_SPLITS)}, got {split!r}.")
    text = files(__name__).joinpath("t2i_compbench", f"{category}_{split}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def t2i_compbench_prompt_file(category: str, split: str = "val") -> str:
    """The path of a shipped T2I-CompBench prompt file, for commands that take a prompts file."""
    t2i_compbench_prompts(category, split)  # validates both arguments
    return str(files(__name__).joinpath("t2i_compbench", f"{category}_{split}.txt"))
