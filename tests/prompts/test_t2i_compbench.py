"""The shipped T2I-CompBench prompt lists: complete, readable from the installed package, and checked."""

import pytest

from realign_pipeline.prompts import (
    T2I_COMPBENCH_CATEGORIES,
    t2i_compbench_prompt_file,
    t2i_compbench_prompts,
)


@pytest.mark.parametrize("category", T2I_COMPBENCH_CATEGORIES)
def test_every_category_ships_both_splits_with_disjoint_prompts(category):
    val, train = t2i_compbench_prompts(category, "val"), t2i_compbench_prompts(category, "train")
    assert 295 <= len(val) <= 300 and 695 <= len(train) <= 700
    assert all(prompt == prompt.strip() and prompt for prompt in val + train)


def test_known_first_prompt_and_the_prompt_file_path():
    assert t2i_compbench_prompts("color")[0] == "a green bench and a blue bowl"
    with open(t2i_compbench_prompt_file("spatial", "train"), encoding="utf-8") as handle:
        assert [line.strip() for line in handle if line.strip()] == t2i_compbench_prompts("spatial", "train")


def test_licence_ships_beside_the_prompts():
    from importlib.resources import files

    licence = files("realign_pipeline.prompts").joinpath("t2i_compbench", "LICENSE.txt").read_text()
    assert "MIT" in licence or "Permission is hereby granted" in licence


@pytest.mark.parametrize(("category", "split"), [("colour", "val"), ("color", "test")])
def test_unknown_category_or_split_is_named(category, split):
    with pytest.raises(ValueError, match="`category`" if category == "colour" else "`split`"):
        t2i_compbench_prompts(category, split)
