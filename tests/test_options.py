"""The one --config/--set reader: types from the dataclass, limits, and where each value came from."""

from dataclasses import dataclass, field

import pytest

from realign_pipeline.errors import UsageError
from realign_pipeline.options import (
    AT_LEAST_ONE,
    FRACTION,
    Limit,
    check_fields,
    check_model_source,
    describe_type,
    matches,
    read_options,
    select_named,
)


@dataclass
class Options:
    steps: int = 10
    rate: float = 0.5
    name: str = "a"
    channels: tuple[int, ...] = (8, 16)
    limit: int | None = None
    flag: bool = False
    rewards: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self, {"steps": AT_LEAST_ONE, "rate": FRACTION, "channels": Limit(8, multiple_of=8)})


@pytest.mark.parametrize(
    ("limit", "inside", "outside", "words"),
    [
        (Limit(0, low_open=True), [1e-9, 5], [0, -1, float("inf"), float("nan")], "> 0"),
        (AT_LEAST_ONE, [1, 7], [0, -3], ">= 1"),
        (Limit(0, 1, high_open=True), [0, 0.999], [1, -0.1], "in [0, 1)"),
        (Limit(8, multiple_of=8), [8, 64], [4, 12, 0], "a multiple of 8, >= 8"),
        (Limit(high=2), [-5, 2], [2.5], "<= 2"),
    ],
)
def test_a_limit_admits_its_range_and_says_it(limit, inside, outside, words):
    assert all(limit.admits(value) for value in inside)
    assert not any(limit.admits(value) for value in outside)
    assert limit.describe() == words


def test_types_are_matched_as_the_annotations_say():
    assert matches(3, float) and not matches(True, float) and not matches(3.0, int) and not matches(True, int)
    assert matches(None, int | None) and matches([1, 2], list[int]) and not matches([1, "2"], list[int])
    assert matches((8, 16), tuple[int, ...]) and matches({"a": 1}, dict[str, int]) and not matches("x", dict[str, int])
    assert describe_type(int | None) == "an integer or null"
    assert describe_type(list[int]) == "a list of integers"
    assert describe_type(list[dict[str, int]]) == "a list of mappings"


def test_file_then_set_each_named_in_its_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\nrate: 2.5e-1\nchannels: [16, 32]\n")
    options = read_options(Options, path, ["name=b", "limit=null"], base={"steps": 1, "flag": True})
    assert options == Options(steps=3, rate=0.25, name="b", channels=(16, 32), limit=None, flag=True)
    path.write_text("steps: 0\n")
    with pytest.raises(UsageError, match=rf"^{path}: steps must be an integer >= 1, got 0$"):
        read_options(Options, path)
    with pytest.raises(UsageError, match=r"^--set: rate must be a number in \[0, 1\], got 2$"):
        read_options(Options, None, ["rate=2"])
    with pytest.raises(
        UsageError, match=r"^--set: channels must be a list of integers a multiple of 8, >= 8, got \(8, 12\)$"
    ):
        read_options(Options, None, ["channels=[8, 12]"])
    with pytest.raises(UsageError, match=r"^defaults: flag must be true or false, got 'yes please'$"):
        read_options(Options, base={"flag": "yes please"})
    with pytest.raises(UsageError, match=r"^--set: unknown option 'step' \(did you mean 'steps'\?\)$"):
        read_options(Options, None, ["step=3"])
    with pytest.raises(UsageError, match=r"^--set: unknown option 'zzz' \(known options: channels, flag, limit, "):
        read_options(Options, None, ["zzz=3"])


def test_model_sources_are_folders_with_their_files_or_hub_ids(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    check_model_source("--model", str(tmp_path), ["model_index.json"])
    check_model_source("--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", ["model_index.json"])
    with pytest.raises(UsageError, match=r"the folder has no unet/config\.json \(not a diffusers folder\)$"):
        check_model_source("--realign-unet", str(tmp_path), ["unet/config.json"])
    with pytest.raises(UsageError, match=r"a file, not a diffusers folder or a Hub repo id$"):
        check_model_source("--model", str(tmp_path / "model_index.json"), ["model_index.json"])
    with pytest.raises(UsageError, match=r"no such folder \(and not a Hub repo id such as owner/name\)$"):
        check_model_source("--model", "./outputs/run", ["model_index.json"])


def test_select_named_keeps_the_order_given_and_names_every_mistake():
    available = {"base": 1, "full": 2, "true": 3}
    assert select_named(["true", "base"], available) == [3, 1]
    with pytest.raises(ValueError, match=r"unknown row\(s\) \['fll'\]; expected some of \['base', 'full', 'true'\]"):
        select_named(["fll"], available, what="row")
    with pytest.raises(ValueError, match=r"configuration\(s\) named more than once: \['base'\]"):
        select_named(["base", "full", "base"], available)
    with pytest.raises(ValueError, match="no configurations selected"):
        select_named([], available)
