"""The evaluation table: Wilson and paired intervals, true-mask regions, seeds per prompt, table formatting, and
``realign eval`` end to end."""

import json
import math
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.cli import BUILTIN_WORLD, main
from realign_pipeline.pipeline_realign_diff import DroppedRegion, Layout, Region
from realign_pipeline.shapes.data import (
    EVAL_CATEGORIES,
    PALETTE,
    evaluation_prompts,
    parse_prompt,
    phrase_for,
    relation_holds,
    render_scene,
    scene_for_prompt,
)
from realign_pipeline.shapes.evaluate import (
    CONFIGURATION_NAMES,
    DEFAULT_SEEDS,
    FINETUNE_COMMAND,
    CategoryResult,
    ConfigurationPair,
    ConfigurationResult,
    EvalConfiguration,
    EvalSettings,
    PairedDifference,
    category_result,
    check_world,
    checkpoint_key,
    compare_pair,
    default_pairs,
    evaluation_prompt_sets,
    format_criteria_table,
    format_pairs_table,
    format_table,
    initial_noise,
    latent_shape,
    load_pipeline,
    paired_comparisons,
    paired_difference,
    pairs_for,
    pass_matrix,
    run_configuration,
    run_evaluation,
    select_configurations,
    student_t_quantile,
    true_mask_regions,
    wilson_interval,
)
from realign_pipeline.shapes.grounder import ShapesGrounder
from realign_pipeline.shapes.judge import Detection, evaluate

Z = 1.96
# The pipeline's parts; the captioner, samples and model card are not needed to generate.
WORLD_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def copy_world(destination: Path, extra_unets: tuple[str, ...] = ()) -> Path:
    """The built-in world's pipeline parts, with its base UNet copied to each of ``extra_unets``."""
    destination.mkdir(parents=True)
    for part in WORLD_PARTS:
        source = BUILTIN_WORLD / part
        if source.is_dir():
            shutil.copytree(source, destination / part)
        else:
            shutil.copyfile(source, destination / part)
    for name in extra_unets:
        shutil.copytree(BUILTIN_WORLD / "unet", destination / name)
    return destination


def wilson_closed_form(successes: int, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of the quadratic (Wilson 1927), written apart from the module's form."""
    p = successes / n
    root = Z * math.sqrt(Z * Z + 4 * n * p * (1 - p))
    return (2 * n * p + Z * Z - root) / (2 * (n + Z * Z)), (2 * n * p + Z * Z + root) / (2 * (n + Z * Z))


@pytest.mark.parametrize("successes, n", [(0, 10), (10, 10), (5, 10), (1, 3), (42, 96)])
def test_wilson_interval_matches_the_closed_form(successes, n):
    low, high = wilson_interval(successes, n)
    expected_low, expected_high = wilson_closed_form(successes, n)
    assert low == pytest.approx(max(0.0, expected_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, expected_high), abs=1e-12)


def test_wilson_interval_known_values():
    # At the ends the bounds are z²/(n+z²) and n/(n+z²); 5/10 is symmetric about 0.5.
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z * Z / (10 + Z * Z)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z * Z), 1.0))
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval, no correction).
    published = {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }
    for (successes, n), bounds in published.items():
        assert wilson_interval(successes, n) == pytest.approx(bounds, abs=5e-5)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_true_mask_regions_union_each_groups_objects():
    prompt = "two red circles and a blue square"
    regions = true_mask_regions(prompt, np.random.default_rng(3))
    # The same seed gives the same layout: the reference to compare against.
    scene = scene_for_prompt(prompt, np.random.default_rng(3))
    image, masks = render_scene(scene)
    assert [caption for caption, _ in regions] == ["two red circles", "a blue square"]
    red = [k for k, obj in enumerate(scene.objects) if obj.group == 0]
    assert len(red) == 2
    np.testing.assert_array_equal(regions[0][1], masks[red[0]] | masks[red[1]])
    np.testing.assert_array_equal(regions[1][1], masks[[k for k in range(len(masks)) if k not in red][0]])
    # The masks cover the right objects: their pixels are drawn in the group's colour, and they do not overlap.
    pixels = np.asarray(image, dtype=np.float32)
    for (_, mask), colour in zip(regions, ("red", "blue")):
        assert np.abs(pixels[mask].mean(0) - PALETTE[colour]).max() < 20
    assert not (regions[0][1] & regions[1][1]).any()


def test_true_mask_regions_satisfy_the_relation():
    regions = true_mask_regions("a green square on the left of a yellow circle", np.random.default_rng(0))
    centers = [np.argwhere(mask).mean(0)[::-1] for _, mask in regions]  # (x, y)
    assert [caption for caption, _ in regions] == ["a green square", "a yellow circle"]
    assert relation_holds(centers[0], "on the left of", centers[1])


def test_configurations_default_order_and_selection():
    assert CONFIGURATION_NAMES == (
        "base",
        "reweight-attention",
        "reweight-grounded",
        "reweight-true-masks",
        "refl",
        "ranked",
        "full",
        "full-attention",
    )
    full = select_configurations(["full", "base"], full_unet="unet-ranked")
    assert [c.name for c in full] == ["full", "base"]
    assert (full[0].unet_subfolder, full[0].realign, full[0].masks) == ("unet-ranked", True, "grounder")
    with pytest.raises(ValueError, match="unknown configuration"):
        select_configurations(["base", "nope"])
    with pytest.raises(ValueError, match="more than once"):
        select_configurations(["base", "base"])
    with pytest.raises(ValueError, match="full_unet"):
        select_configurations(["full"], full_unet="unet")
    with pytest.raises(ValueError, match="masks"):
        EvalConfiguration("x", "re-weighting without masks", realign=True)


def category(name: str, n: int, passed: int, seconds: float) -> CategoryResult:
    return CategoryResult(name, n, passed, n, passed, passed, None, seconds)


def test_format_table_rows_columns_and_pooled_accuracy():
    base, full = select_configurations(["base", "full"])
    results = [
        ConfigurationResult(
            base, {"binding": category("binding", 96, 42, 9.6), "count": category("count", 76, 0, 7.6)}
        ),
        ConfigurationResult(
            full, {"binding": category("binding", 96, 96, 19.2), "count": category("count", 76, 38, 15.2)}
        ),
    ]
    lines = format_table(results).splitlines()
    assert (
        lines[0] == "| configuration | UNet | re-weighting | binding (n=96) | count (n=76) | all (n=172) | s/image |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|"
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:4] == ["base", "unet", "off", "43.8 [34.3, 53.7]"]
    low, high = wilson_interval(42, 172)
    assert cells[5] == f"{100 * 42 / 172:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    assert cells[6] == "0.100"
    cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells[:3] == ["full", "unet-refl", "grounder masks"]
    assert cells[3].startswith("100.0 [") and cells[3].endswith(", 100.0]")
    assert cells[4] == "50.0 [39.0, 61.0]" and cells[6] == "0.200"
    assert len(lines) == 4


def test_criteria_table_scores_each_category_by_its_own_check():
    base = select_configurations(["base"])[0]
    binding = CategoryResult("binding", 10, 1, 10, 7, 1, None, 1.0)
    count = CategoryResult("count", 20, 0, 20, 3, 5, None, 1.0)
    lines = format_criteria_table([ConfigurationResult(base, {"binding": binding, "count": count})]).splitlines()
    assert lines[0] == "| configuration | binding: binding correct (n=10) | count: count correct (n=20) |"
    low, high = wilson_interval(7, 10)
    assert lines[2] == f"| base | 70.0 [{100 * low:.1f}, {100 * high:.1f}] | 25.0 [" + lines[2].split("25.0 [")[1]


def eval_args(world: Path, output: Path) -> list[str]:
    return ["eval", "--world", str(world), "--output", str(output), "--prompts-per-category", "2", "--steps", "3"]


def test_eval_seeds_default_is_the_modules():
    from realign_pipeline.cli import SHAPES_SEEDS

    # cli keeps its own copy (importing shapes.evaluate would load torch for --help): they must agree.
    assert DEFAULT_SEEDS == EvalSettings().seeds == SHAPES_SEEDS == 4


def test_realign_eval_end_to_end(tmp_path, capsys):
    world = copy_world(tmp_path / "world", extra_unets=("unet-refl",))
    output = tmp_path / "eval"
    configurations = ["base", "reweight-attention", "reweight-grounded", "reweight-true-masks", "refl"]
    main([*eval_args(world, output), "--seeds", "2", "--configurations", *configurations])

    printed = capsys.readouterr().out
    # n counts images: 2 prompts x 2 seeds per category.
    assert (
        "| configuration | UNet | re-weighting | binding (n=4) | relation (n=4) | count (n=4) | all (n=12)" in printed
    )
    assert str(output / "results.json") in printed
    report = json.loads((output / "results.json").read_text())
    assert report["settings"]["num_inference_steps"] == 3 and report["settings"]["split"] == "held_out"
    assert report["settings"]["seeds"] == 2 and report["seeds_per_prompt"] == 2
    assert report["prompts"] == dict.fromkeys(EVAL_CATEGORIES, 2) and report["prompts_total"] == 6
    assert report["images_per_configuration"] == 12
    assert {"torch", "diffusers", "realign-pipeline"} <= set(report["versions"])
    assert [r["configuration"]["name"] for r in report["results"]] == configurations
    for result in report["results"]:
        assert list(result["categories"]) == list(EVAL_CATEGORIES)
        for name, row in [*result["categories"].items(), ("all", result["all"])]:
            assert row["n"] == (12 if name == "all" else 4)
            assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy"] == row["passed"] / row["n"]
            low, high = row["ci95"]
            assert 0.0 <= low <= row["accuracy"] <= high <= 1.0
            assert row["seconds_per_image"] > 0
        for name, row in result["categories"].items():
            # Every seed of every prompt, all seeds of a prompt together.
            assert [(r["prompt_index"], r["seed_index"]) for r in row["records"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
            assert row["records"][0]["prompt"] == row["records"][1]["prompt"] != row["records"][2]["prompt"]
            for rate in ("objects_present_rate", "binding_correct_rate", "count_correct_rate"):
                assert 0.0 <= row[rate] <= 1.0
            assert (row["relation_correct_rate"] is None) == (name != "relation")
    # refl's UNet is a copy of the base one: the same noise per prompt must give the same images and verdicts.
    by_name = {r["configuration"]["name"]: r for r in report["results"]}
    for name in EVAL_CATEGORIES:
        assert by_name["refl"]["categories"][name]["records"] == by_name["base"]["categories"][name]["records"]
    # True masks give one region per object group, captioned with the group's phrase; plain rows have no layout.
    for record in by_name["reweight-true-masks"]["categories"]["count"]["records"]:
        assert record["regions"] == [phrase_for(group) for group in parse_prompt(record["prompt"]).groups]
    assert all("regions" in r for r in by_name["reweight-attention"]["categories"]["binding"]["records"])
    assert all("regions" not in r for r in by_name["base"]["categories"]["binding"]["records"])
    # The paired table: the pairs whose two rows ran, in default_pairs' order, printed and in results.json.
    expected_pairs = [("reweight-grounded", "base"), ("reweight-true-masks", "base")]
    expected_pairs += [("reweight-attention", "base"), ("refl", "base")]
    expected_pairs += [("reweight-true-masks", "reweight-grounded")]
    assert [(p["first"], p["second"]) for p in report["paired"]] == expected_pairs
    assert "| comparison | what it measures | binding (prompts=2, images=4) |" in printed
    paired = {(p["first"], p["second"]): p for p in report["paired"]}
    # refl's UNet is a copy: every image is the same, so the difference is exactly 0 in every category.
    refl = paired[("refl", "base")]
    assert all(d["difference"] == 0 and d["ci95"] == [0, 0] for d in [*refl["categories"].values(), refl["all"]])
    assert (refl["all"]["prompts"], refl["all"]["images"]) == (6, 12)
    # Each difference is the difference of the two rows' pooled pass rates.
    for (first, second), comparison in paired.items():
        for name in EVAL_CATEGORIES:
            rates = [by_name[row]["categories"][name]["accuracy"] for row in (first, second)]
            assert comparison["categories"][name]["difference"] == pytest.approx(rates[0] - rates[1])
    assert (output / "table.md").read_text().strip() == report["table"]
    assert report["table"].count("| comparison |") == 1
    # Every row was saved; the same command again reads them back (a resumed run) to the same report.
    assert sorted(path.stem for path in (output / "checkpoints").glob("*.json")) == sorted(configurations)
    main([*eval_args(world, output), "--seeds", "2", "--configurations", *configurations])
    resumed = json.loads((output / "results.json").read_text())
    assert resumed["table"] == report["table"] and resumed["paired"] == report["paired"]
    for row, again in zip(report["results"], resumed["results"], strict=True):
        for name in EVAL_CATEGORIES:
            assert row["categories"][name]["records"] == again["categories"][name]["records"]
    for name in configurations:
        sheet = PIL.Image.open(output / f"contact-sheet-{name}.png")
        assert sheet.height > 3 * 64  # one row of images per category


def test_realign_eval_hands_the_re_weighting_strengths_to_the_ablation(tmp_path, capsys):
    world = copy_world(tmp_path / "world")
    output = tmp_path / "eval"
    strengths = ["--cross-attention-weight", "0.5", "--self-attention-weight", "0.8", "--modulation-fraction", "0.4"]
    main([*eval_args(world, output), "--seeds", "1", "--configurations", "base", *strengths])
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert (settings["cross_attention_weight"], settings["self_attention_weight"]) == (0.5, 0.8)
    assert settings["modulation_fraction"] == 0.4
    assert "re-weighting rows: cross 0.5, self 0.8, 40% of the steps" in capsys.readouterr().out


def test_missing_finetuned_unet_fails_before_generating(tmp_path, capsys):
    world = copy_world(tmp_path / "world")
    output = tmp_path / "eval"
    with pytest.raises(SystemExit) as raised:
        main([*eval_args(world, output), "--configurations", "base", "refl"])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and "unet-refl" in error and FINETUNE_COMMAND in error
    assert not output.exists()
    with pytest.raises(FileNotFoundError, match="unet-ranked.*needed by full"):
        run_evaluation(world, select_configurations(["base", "full"], full_unet="unet-ranked"))
    check_world(world, select_configurations(["base", "reweight-true-masks"]))  # the base UNet is there


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--prompts-per-category", "0"], "--prompts-per-category"),
        (["--steps", "-1"], "--steps"),
        (["--configurations", "base", "nope"], "--configurations"),
        (["--split", "train"], "--split"),
        (["--full-unet", "unet"], "--full-unet"),
        (["--guidance-scale", "nan"], "--guidance-scale"),
        (["--threads", "0"], "--threads"),
        (["--seeds", "0"], "--seeds"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, arguments, named):
    with pytest.raises(SystemExit):
        main(["eval", "--output", str(tmp_path / "eval"), *arguments])
    assert named in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_world_without_a_pipeline_and_repeated_configurations_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--world", str(tmp_path), "--output", str(tmp_path / "eval")])
    assert "--world" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--configurations", "base", "base", "--output", str(tmp_path / "eval")])
    assert re.search("--configurations.*more than once", capsys.readouterr().err)


def test_wilson_interval_bounds_are_exact_at_the_ends():
    # Without clamping, rounding puts these bounds just outside [0, 1] (5/5: 1 + 2e-16; 0/1: -1e-17).
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 1)[0] == 0.0
    # One trial is a valid sample.
    assert wilson_interval(1, 1) == pytest.approx((1 / (1 + Z * Z), 1.0))


def test_wilson_interval_with_another_z():
    # 3 of 4 at z = 1: centre (0.75 + 1/8) / 1.25 = 0.7, half-width 0.8 * sqrt(3/64 + 1/64) = 0.2.
    assert wilson_interval(3, 4, z=1.0) == pytest.approx((0.5, 0.9), abs=1e-12)


def found(colour: str, shape: str, x: float, y: float) -> Detection:
    """A hand-made detection: only colour, shape and centre matter to the verdict."""
    x0, y0 = int(x) - 8, int(y) - 8
    return Detection(colour, shape, (x0, y0, x0 + 16, y0 + 16), 200, (x, y), np.zeros((64, 64), dtype=bool))


COUNT_PROMPT = "two red circles and a blue square"
RELATION_PROMPT = "a red circle on the left of a blue square"
# (detections, (objects present, binding, count, passed)) for hand-made images of COUNT_PROMPT.
COUNT_CASES = [
    ([found("red", "circle", 10, 10), found("red", "circle", 30, 10), found("blue", "square", 50, 50)], (1, 1, 1, 1)),
    # every pairing is there (binding right) but a red circle is missing: the count is wrong, so no pass
    ([found("red", "circle", 10, 10), found("blue", "square", 50, 50)], (0, 1, 0, 0)),
    # everything asked for, and a green triangle nobody asked for
    (
        [
            found("red", "circle", 10, 10),
            found("red", "circle", 30, 10),
            found("blue", "square", 50, 50),
            found("green", "triangle", 50, 10),
        ],
        (1, 1, 0, 0),
    ),
    # the right shapes in the wrong colours: present, but not bound
    ([found("blue", "circle", 10, 10), found("blue", "circle", 30, 10), found("red", "square", 50, 50)], (1, 0, 0, 0)),
]


def test_only_an_image_that_passes_every_check_passes():
    verdicts = [evaluate(detections, parse_prompt(COUNT_PROMPT), COUNT_PROMPT) for detections, _ in COUNT_CASES]
    for verdict, (_, (present, binding, count, passed)) in zip(verdicts, COUNT_CASES):
        assert (verdict.objects_present, verdict.binding_correct, verdict.count_correct) == (present, binding, count)
        assert verdict.passed == bool(passed) and verdict.relation_correct is None
    assert [v.passed for v in verdicts] == [True, False, False, False]

    result = category_result("count", verdicts, seconds=2.0)
    assert (result.n, result.passed, result.objects_present, result.binding_correct, result.count_correct) == (
        4,
        1,
        3,
        3,
        1,
    )
    assert result.relation_correct is None
    row = result.as_dict()
    assert (row["category"], row["n"], row["passed"], row["generation_seconds"]) == ("count", 4, 1, 2.0)
    assert row["accuracy"] == 0.25 and row["ci95"] == list(wilson_interval(1, 4))
    assert (row["objects_present_rate"], row["binding_correct_rate"], row["count_correct_rate"]) == (0.75, 0.75, 0.25)
    assert row["seconds_per_image"] == 0.5 and row["relation_correct_rate"] is None
    assert [record["passed"] for record in row["records"]] == [True, False, False, False]
    assert row["records"][1]["reasons"] == [
        "shapes found {'circle': 1, 'square': 1, 'triangle': 0}, needed {'circle': 2, 'square': 1, 'triangle': 0}",
        "counts red circle: 1/2, blue square: 1/1",
    ]


def test_a_wrong_relation_fails_an_otherwise_right_image():
    spec = parse_prompt(RELATION_PROMPT)
    right = evaluate([found("red", "circle", 10, 32), found("blue", "square", 50, 32)], spec, RELATION_PROMPT)
    swapped = evaluate([found("red", "circle", 50, 32), found("blue", "square", 10, 32)], spec, RELATION_PROMPT)
    assert (right.relation_correct, right.passed) == (True, True)
    assert (swapped.objects_present, swapped.binding_correct, swapped.count_correct) == (True, True, True)
    assert (swapped.relation_correct, swapped.passed) == (False, False)
    result = category_result("relation", [right, swapped, swapped], seconds=3.0)
    assert (result.n, result.passed, result.binding_correct, result.count_correct, result.relation_correct) == (
        3,
        1,
        3,
        3,
        1,
    )
    assert result.as_dict()["relation_correct_rate"] == pytest.approx(1 / 3)


def test_records_keep_each_verdict_and_the_regions_used_and_dropped():
    spec = parse_prompt(RELATION_PROMPT)
    right = evaluate([found("red", "circle", 10, 32), found("blue", "square", 50, 32)], spec, RELATION_PROMPT)
    wrong = evaluate([found("red", "circle", 50, 32)], spec, RELATION_PROMPT)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    layout = Layout(
        RELATION_PROMPT,
        [Region("a red circle", mask, [2, 3], "attention")],
        [DroppedRegion("a blue square", "empty mask")],
    )
    result = category_result("relation", [right, wrong], 1.0, [layout, None])
    assert result.category == "relation"
    assert result.records[0] == {
        "prompt": RELATION_PROMPT,
        "prompt_index": 0,
        "seed_index": 0,
        "passed": True,
        "objects_present": True,
        "binding_correct": True,
        "count_correct": True,
        "relation_correct": True,
        "reasons": [],
        "regions": ["a red circle"],
        "dropped_regions": [{"caption": "a blue square", "reason": "empty mask"}],
    }
    assert result.records[1] == {
        "prompt": RELATION_PROMPT,
        "prompt_index": 1,
        "seed_index": 0,
        "passed": False,
        "objects_present": False,
        "binding_correct": False,
        "count_correct": False,
        "relation_correct": False,
        "reasons": wrong.reasons,
    }
    assert wrong.reasons[0].startswith("shapes found")


def test_category_result_refuses_mismatched_inputs():
    verdict = evaluate([], parse_prompt(COUNT_PROMPT), COUNT_PROMPT)
    with pytest.raises(ValueError, match="no verdicts"):
        category_result("count", [], 1.0)
    with pytest.raises(ValueError, match="2 layouts for 1 verdicts"):
        category_result("count", [verdict], 1.0, [None, None])


def test_initial_noise_depends_on_the_prompt_alone():
    shape = (4, 16, 16)
    a = initial_noise(0, 1, 2, shape)
    assert a.shape == shape and torch.equal(a, initial_noise(0, 1, 2, shape))
    others = [initial_noise(1, 1, 2, shape), initial_noise(0, 2, 2, shape), initial_noise(0, 1, 3, shape)]
    assert all(not torch.allclose(a, other) for other in others)
    assert abs(a.mean().item()) < 0.15 and abs(a.std().item() - 1) < 0.1  # standard normal, 1024 draws
    # The stream is pinned: published tables were drawn from it, and a silent change would redraw them.
    assert initial_noise(0, 0, 0, (4,)).tolist() == pytest.approx([0.5458652, -0.3587555, -0.7178655, 0.7713175])
    assert initial_noise(7, 2, 5, (2,)).tolist() == pytest.approx([-1.2507457, 1.6611096])
    # Seed index 0 is that same stream; other seed indices are other streams, each pinned too.
    assert torch.equal(initial_noise(7, 2, 5, (2,), seed_index=0), initial_noise(7, 2, 5, (2,)))
    seeds = [initial_noise(0, 1, 2, shape, seed_index=s) for s in range(4)]
    assert torch.equal(seeds[0], a) and all(not torch.allclose(seeds[i], seeds[j]) for i in range(4) for j in range(i))
    assert not torch.allclose(seeds[1], initial_noise(0, 1, 3, shape))  # seed 1 of prompt 2 is not prompt 3
    assert initial_noise(0, 0, 0, (2,), seed_index=1).tolist() == pytest.approx([-1.6613646, -1.2997417])
    with pytest.raises(ValueError, match="seed_index must be >= 0, got -1"):
        initial_noise(0, 0, 0, (2,), seed_index=-1)


def test_latent_shape_reads_the_unet_config():
    def fake(sample_size):
        return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size, in_channels=4)))

    assert latent_shape(fake(16)) == (4, 16, 16)
    assert latent_shape(fake((16, 8))) == (4, 16, 8)


class SpyPipeline:
    """The real pipeline, recording the prompts, initial latents, arguments and duration of every call."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[tuple[list[str], torch.Tensor, dict]] = []
        self.durations: list[float] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs["latents"].clone(), kwargs))
        started = time.perf_counter()
        output = self.pipe(prompts, **kwargs)
        self.durations.append(time.perf_counter() - started)
        return output

    def latents_by_prompt(self) -> dict[str, torch.Tensor]:
        return {prompt: latents[k] for prompts, latents, _ in self.calls for k, prompt in enumerate(prompts)}


@pytest.fixture(scope="module")
def world_pipe():
    return load_pipeline(BUILTIN_WORLD)


def test_every_configuration_starts_each_prompt_from_the_same_noise(world_pipe):
    prompt_sets = {"binding": ["a red circle and a blue square", "a green triangle and a white circle"]}
    prompt_sets["count"] = ["two red circles"]
    runs = {}
    for name, batch_size in [("base", 2), ("reweight-true-masks", 1), ("reweight-attention", 2), ("base", 1)]:
        spy = SpyPipeline(world_pipe)
        settings = EvalSettings(num_inference_steps=1, batch_size=batch_size, seed=3, seeds=1)
        result = run_configuration(spy, select_configurations([name])[0], prompt_sets, settings)
        runs[(name, batch_size)] = spy, result
    reference = runs[("base", 2)][0].latents_by_prompt()
    prompts = [p for group in prompt_sets.values() for p in group]
    assert list(reference) == prompts
    assert reference[prompts[0]].shape == latent_shape(world_pipe) == (4, 16, 16)
    for spy, _ in runs.values():
        latents = spy.latents_by_prompt()
        assert all(torch.equal(latents[prompt], reference[prompt]) for prompt in prompts)
    # Different prompts start from different noise, and the noise is initial_noise(seed, category, index).
    assert not torch.allclose(reference[prompts[0]], reference[prompts[1]])
    assert torch.equal(reference[prompts[2]], initial_noise(3, 1, 0, (4, 16, 16)))
    # The pipeline draws from the latents it was handed: the same prompt gives the same image in any batching.
    image = np.asarray(runs[("base", 2)][1].samples["binding"][1][0], dtype=np.int16)
    alone = np.asarray(runs[("base", 1)][1].samples["binding"][1][0], dtype=np.int16)
    assert np.abs(image - alone).max() <= 1
    # The rows differ only by what they configure: re-weighting, and the true masks' regions (one list per prompt).
    true_masks = [kwargs for *_, kwargs in runs[("reweight-true-masks", 1)][0].calls]
    assert all(kwargs["realign"] is True and len(kwargs["regions"]) == 1 for kwargs in true_masks)
    assert all(kwargs["realign"] is False and kwargs["regions"] is None for *_, kwargs in runs[("base", 2)][0].calls)


def test_run_configuration_hands_the_settings_to_the_pipeline_and_counts_every_prompt(world_pipe):
    prompt_sets = {"binding": ["a red circle and a blue square", "a green triangle and a white circle"]}
    prompt_sets["relation"] = ["a red circle on the left of a blue square"]
    prompts = [*prompt_sets["binding"], *prompt_sets["relation"]]
    settings = EvalSettings(
        num_inference_steps=1,
        guidance_scale=2.5,
        batch_size=2,
        seed=4,
        coarse_stop_fraction=0.5,
        seeds=1,
        cross_attention_weight=0.7,
        self_attention_weight=1.0,
        modulation_fraction=0.6,
    )
    spies = {}
    for name in ("reweight-true-masks", "reweight-grounded"):
        spies[name] = spy = SpyPipeline(world_pipe)
        configuration = select_configurations([name])[0]
        started = time.perf_counter()
        result = run_configuration(spy, configuration, prompt_sets, settings)
        wall = time.perf_counter() - started
        assert result.configuration is configuration
        assert [(c.category, c.n) for c in result.categories.values()] == [("binding", 2), ("relation", 1)]
        assert [r["prompt"] for c in result.categories.values() for r in c.records] == prompts
        assert all("regions" in r for c in result.categories.values() for r in c.records)
        # Generation time alone: at least each category's pipeline calls, at most the whole run.
        assert all(c.seconds >= d for c, d in zip(result.categories.values(), spy.durations))  # a call per category
        assert sum(c.seconds for c in result.categories.values()) <= wall
        assert result.categories["relation"].relation_correct is not None
        assert result.categories["binding"].relation_correct is None
        assert [len(call[0]) for call in spy.calls] == [2, 1]
        for batch_index, (_, _, kwargs) in enumerate(spy.calls):
            steps = (kwargs["num_inference_steps"], kwargs["guidance_scale"], kwargs["coarse_stop_fraction"])
            assert steps == (1, 2.5, 0.5)
            strengths = (kwargs["cross_attention_weight"], kwargs["self_attention_weight"])
            assert strengths == (0.7, 1.0) and kwargs["modulation_fraction"] == 0.6
            assert kwargs["realign"] is True and kwargs["generator"].initial_seed() == 4 + batch_index
    # True masks: the layout of each prompt comes from its own stream (seed, category position, index).
    true_masks = spies["reweight-true-masks"].calls
    handed = [
        (prompt, regions) for prompts, _, kwargs in true_masks for prompt, regions in zip(prompts, kwargs["regions"])
    ]
    for (prompt, regions), (position, index) in zip(handed, [(0, 0), (0, 1), (1, 0)]):
        expected = true_mask_regions(prompt, np.random.default_rng([4, position, index]))
        assert [caption for caption, _ in regions] == [caption for caption, _ in expected]
        assert all(np.array_equal(mask, want) for (_, mask), (_, want) in zip(regions, expected))
    assert all(kwargs["grounder"] is None for *_, kwargs in true_masks)
    grounded = [kwargs for *_, kwargs in spies["reweight-grounded"].calls]
    assert all(isinstance(kwargs["grounder"], ShapesGrounder) and kwargs["regions"] is None for kwargs in grounded)


def test_run_configuration_time_adds_up_over_batches(world_pipe):
    spy = SpyPipeline(world_pipe)
    settings = EvalSettings(num_inference_steps=1, batch_size=1, seeds=1)
    prompt_sets = {"binding": ["a red circle and a blue square", "a green triangle and a white circle"]}
    result = run_configuration(spy, select_configurations(["base"])[0], prompt_sets, settings)
    assert len(spy.durations) == 2 and result.categories["binding"].seconds >= sum(spy.durations)


def test_run_evaluation_returns_rows_in_the_order_asked_each_with_its_own_unet(world_pipe):
    settings = EvalSettings(prompts_per_category=1, num_inference_steps=1, seeds=1)
    results = run_evaluation(BUILTIN_WORLD, select_configurations(["refl", "base"]), settings, progress=False)
    assert [r.configuration.name for r in results] == ["refl", "base"]
    for result in results:
        assert list(result.categories) == list(EVAL_CATEGORIES) and result.n == 3
        prompts = [record["prompt"] for c in result.categories.values() for record in c.records]
        assert prompts == [evaluation_prompts(c, "held_out", 1, seed=0)[0] for c in EVAL_CATEGORIES]
    # Each row drew with its own UNet: the same images as a direct run on that UNet, and the two rows differ.
    prompt_sets = {"binding": [results[0].categories["binding"].records[0]["prompt"]]}
    for result, pipe in [(results[0], load_pipeline(BUILTIN_WORLD, "unet-refl")), (results[1], world_pipe)]:
        direct = run_configuration(pipe, result.configuration, prompt_sets, settings)
        assert np.array_equal(np.asarray(direct.samples["binding"][0][0]), np.asarray(result.samples["binding"][0][0]))
    refl_image, base_image = (np.asarray(r.samples["binding"][0][0], dtype=np.int16) for r in results)
    assert np.abs(refl_image - base_image).max() > 0


def test_evaluation_prompt_sets_by_split():
    for split in ("held_out", "seen", "development"):
        sets = evaluation_prompt_sets(split, 3)
        assert sets == {c: evaluation_prompts(c, split, 3, seed=0) for c in EVAL_CATEGORIES}
    assert evaluation_prompt_sets("seen", 1) != evaluation_prompt_sets("held_out", 1)
    assert [len(p) for p in evaluation_prompt_sets().values()] == [96, 96, 76]
    with pytest.raises(ValueError, match=r"^split must be one of .*, got 'train'$"):
        evaluation_prompt_sets("train")
    with pytest.raises(ValueError, match="^prompts_per_category must be positive, got 0$"):
        evaluation_prompt_sets("held_out", 0)


def test_load_pipeline_loads_the_asked_unet_in_float32():
    from safetensors.torch import load_file

    pipe = load_pipeline(BUILTIN_WORLD, "unet-refl")
    saved = load_file(str(BUILTIN_WORLD / "unet-refl" / "diffusion_pytorch_model.safetensors"))
    name, weight = next(iter(saved.items()))
    assert weight.dtype == torch.float16 and pipe.unet.dtype == torch.float32
    assert torch.equal(pipe.unet.state_dict()[name], weight.float())
    assert pipe._progress_bar_config == {"disable": True}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompts_per_category": 0}, "prompts_per_category must be positive, got 0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be positive, got 0"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"split": "train"}, "split must be one of"),
        ({"coarse_stop_fraction": 0.0}, r"coarse_stop_fraction must be in \(0, 1\], got 0.0"),
        ({"coarse_stop_fraction": 1.5}, "coarse_stop_fraction must be in"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0, got nan"),
        ({"guidance_scale": -0.5}, "guidance_scale must be a finite number >= 0"),
        ({"cross_attention_weight": float("inf")}, "cross_attention_weight must be a finite number >= 0, got inf"),
        ({"self_attention_weight": -1.0}, "self_attention_weight must be a finite number >= 0"),
        ({"modulation_fraction": 1.5}, r"modulation_fraction must be in \[0, 1\], got 1.5"),
    ],
)
def test_eval_settings_refuse_bad_values_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(**options)


def test_eval_settings_accept_the_edges():
    EvalSettings(coarse_stop_fraction=1.0, guidance_scale=0.0)
    EvalSettings(guidance_scale=0.5, prompts_per_category=1, num_inference_steps=1, batch_size=1)


def test_configurations_refuse_bad_combinations_by_name():
    with pytest.raises(ValueError, match="configuration 'x': masks='true' needs realign=True"):
        EvalConfiguration("x", "masks without re-weighting", masks="true")
    for subfolder in ("", "nested/unet"):
        with pytest.raises(ValueError, match="configuration 'x': unet_subfolder must be a folder name"):
            EvalConfiguration("x", "a path", unet_subfolder=subfolder)
    assert [c.name for c in select_configurations()] == list(CONFIGURATION_NAMES)
    with pytest.raises(ValueError, match="^no configurations selected$"):
        select_configurations([])


def test_check_world_names_every_missing_folder_and_its_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a diffusers pipeline folder"):
        check_world(tmp_path, select_configurations(["base"]))
    world = copy_world(tmp_path / "world")
    with pytest.raises(FileNotFoundError) as raised:
        check_world(world, select_configurations(["refl", "full", "full-attention", "ranked"]))
    assert str(raised.value) == (
        f"missing UNet folder(s): {world / 'unet-refl'} (needed by refl, full, full-attention); "
        f"{world / 'unet-ranked'} (needed by ranked). The fine-tuned UNets (unet-refl, unet-ranked) are made by "
        f"`{FINETUNE_COMMAND}`; run it first, or leave those configurations out."
    )


def test_tables_of_one_row_and_their_exact_lines():
    base = select_configurations(["base"])[0]
    binding = CategoryResult("binding", 4, 1, 4, 2, 1, None, 2.0)
    relation = CategoryResult("relation", 2, 0, 2, 2, 2, 1, 1.0)
    result = ConfigurationResult(base, {"binding": binding, "relation": relation})
    assert format_table([result]).splitlines()[:2] == [
        "| configuration | UNet | re-weighting | binding (n=4) | relation (n=2) | all (n=6) | s/image |",
        "|---|---|---|---|---|---|---|",
    ]
    low, high = wilson_interval(1, 2)
    assert format_criteria_table([result]).splitlines() == [
        "| configuration | binding: binding correct (n=4) | relation: relation correct (n=2) |",
        "|---|---|---|",
        f"| base | 50.0 [{100 * wilson_interval(2, 4)[0]:.1f}, {100 * wilson_interval(2, 4)[1]:.1f}] | "
        f"50.0 [{100 * low:.1f}, {100 * high:.1f}] |",
    ]
    for formatter in (format_table, format_criteria_table):
        with pytest.raises(ValueError, match="^no results to format$"):
            formatter([])


def test_seeds_draw_each_prompt_from_its_own_noise_the_same_in_every_row(world_pipe):
    prompt_sets = {"binding": ["a red circle and a blue square"], "relation": ["a red circle above a blue square"]}
    runs = {}
    for name, batch_size in [("base", 4), ("reweight-true-masks", 2)]:
        spy = SpyPipeline(world_pipe)
        settings = EvalSettings(num_inference_steps=1, batch_size=batch_size, seed=5, seeds=3)
        runs[name] = spy, run_configuration(spy, select_configurations([name])[0], prompt_sets, settings)
    shape = latent_shape(world_pipe)
    expected = [initial_noise(5, position, 0, shape, s) for position in (0, 1) for s in range(3)]
    for spy, result in runs.values():
        handed = [latents for _, batch, _ in spy.calls for latents in batch]
        assert len(handed) == 6 and all(torch.equal(a, b) for a, b in zip(handed, expected))
        assert [prompt for prompts, _, _ in spy.calls for prompt in prompts] == [
            p for prompts in prompt_sets.values() for p in prompts for _ in range(3)
        ]
        for category, category_result_ in result.categories.items():
            assert category_result_.n == 3
            assert [(r["prompt_index"], r["seed_index"]) for r in category_result_.records] == [(0, 0), (0, 1), (0, 2)]
            assert len(pass_matrix(category_result_)) == 1 and len(pass_matrix(category_result_)[0]) == 3
            assert len(result.samples[category]) == 3
    assert [len(prompts) for prompts, _, _ in runs["base"][0].calls] == [3, 3]  # batches never mix categories
    assert [len(prompts) for prompts, _, _ in runs["reweight-true-masks"][0].calls] == [2, 1, 2, 1]
    # True masks: each image's layout comes from its own stream (seed, category position, prompt index, seed index).
    handed = [regions for _, _, kwargs in runs["reweight-true-masks"][0].calls for regions in kwargs["regions"]]
    streams = [(position, s) for position in (0, 1) for s in range(3)]
    for regions, (position, s) in zip(handed, streams, strict=True):
        prompt = prompt_sets[list(prompt_sets)[position]][0]
        want = true_mask_regions(prompt, np.random.default_rng([5, position, 0, s]))
        assert all(np.array_equal(mask, w) for (_, mask), (_, w) in zip(regions, want, strict=True))
    assert not np.array_equal(handed[0][0][1], handed[1][0][1])  # another seed, another layout


def test_true_masks_satisfy_every_held_out_relation_prompt():
    """The relation rows' true masks come from the prompt alone and satisfy its relation by the judge's rule."""
    prompts = evaluation_prompt_sets("held_out", 24)["relation"]
    assert {parse_prompt(p).relation.predicate for p in prompts} == {
        "on the left of",
        "on the right of",
        "above",
        "below",
    }
    for index, prompt in enumerate(prompts):
        relation = parse_prompt(prompt).relation
        for s in range(2):
            regions = true_mask_regions(prompt, np.random.default_rng([0, 1, index, s]))
            centers = [np.argwhere(mask).mean(0)[::-1] for _, mask in regions]  # (x, y)
            assert relation_holds(centers[relation.subject], relation.predicate, centers[relation.object]), prompt
            # ... and not the opposite relation, whatever the order of the regions.
            assert not relation_holds(centers[relation.object], relation.predicate, centers[relation.subject])


def test_student_t_quantile_matches_the_published_table():
    # Two-sided 95% (and 90%) points of Student's t, e.g. Fisher & Yates' tables.
    published = {1: 12.7062, 2: 4.3027, 3: 3.1824, 5: 2.5706, 10: 2.2281, 30: 2.0423, 100: 1.9840}
    for df, value in published.items():
        assert student_t_quantile(0.95, df) == pytest.approx(value, abs=5e-5)
    assert student_t_quantile(0.90, 10) == pytest.approx(1.8125, abs=5e-5)
    # df = 1 is the Cauchy distribution: t = tan(pi * confidence / 2); df = 2 has t = sqrt(2 c^2 / (1 - c^2)).
    assert student_t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert student_t_quantile(0.8, 2) == pytest.approx(math.sqrt(2 * 0.64 / 0.36), rel=1e-12)
    # Large df tends to the normal quantile.
    assert 1.96 < student_t_quantile(0.95, 2000) < 1.9612
    for confidence, df, message in [(1.0, 3, "confidence"), (0.95, 0, "df"), (0.95, 2.5, "df")]:
        with pytest.raises(ValueError, match=message):
            student_t_quantile(confidence, df)


def test_paired_difference_exact_values_on_a_hand_made_case():
    # Three prompts, two seeds each. Per-prompt differences: 1/2, 1/2, 0 -> mean 1/3, sd sqrt(1/12), se 1/6.
    first = [[True, True], [True, False], [False, False]]
    second = [[False, True], [False, False], [False, False]]
    result = paired_difference(first, second)
    half_width = 4.302652729749464 / 6  # t(0.975, 2 df) * se; the upper bound 1/3 + 0.717 is clipped to 1
    assert result == PairedDifference(pytest.approx(1 / 3), pytest.approx(1 / 3 - half_width), 1.0, 3, 6)
    # The difference is the difference of the pooled rates (3/6 - 1/6); swapping the rows flips the sign.
    swapped = paired_difference(second, first)
    assert (swapped.difference, swapped.low, swapped.high) == pytest.approx((-1 / 3, -1.0, -1 / 3 + half_width))
    # The interval is over prompts, not images: the same 2 passes in 4 prompts x 4 seeds vs 16 prompts x 1 seed.
    clustered = paired_difference([[1, 1, 0, 0]] + [[0] * 4] * 3, [[0] * 4] * 4)
    spread = paired_difference([[1], [1]] + [[0]] * 14, [[0]] * 16)
    assert clustered.difference == spread.difference == 0.125
    # Clustered: per-prompt differences 1/2, 0, 0, 0: sd 1/4, se 1/8, t(0.975, 3 df) = 3.182446.
    assert (clustered.low, clustered.high) == pytest.approx((0.125 - 3.182446305 / 8, 0.125 + 3.182446305 / 8))
    assert spread.high - spread.low < clustered.high - clustered.low
    # Identical rows: exactly zero with a zero-width interval; one prompt: no interval.
    assert paired_difference(first, first) == PairedDifference(0.0, 0.0, 0.0, 3, 6)
    # With few prompts t is large, and the interval is clipped to the possible range [-1, 1].
    assert paired_difference([[1], [0]], [[0], [0]]) == PairedDifference(0.5, -1.0, 1.0, 2, 2)
    alone = paired_difference([[True, False]], [[False, False]])
    assert alone.difference == 0.5 and math.isnan(alone.low) and math.isnan(alone.high)
    assert alone.as_dict() == {"difference": 0.5, "ci95": [None, None], "prompts": 1, "images": 2}


def test_paired_difference_refuses_rows_that_do_not_pair():
    with pytest.raises(ValueError, match="first has 2 prompts, second 1"):
        paired_difference([[1], [0]], [[1]])
    with pytest.raises(ValueError, match="same positive number of seeds"):
        paired_difference([[1, 0], [0]], [[1, 0], [0]])
    with pytest.raises(ValueError, match="same positive number of seeds"):
        paired_difference([[1, 0]], [[1]])
    with pytest.raises(ValueError, match="no prompts"):
        paired_difference([], [])


def relation_rows(passes: list[list[bool]], name: str) -> ConfigurationResult:
    """A hand-made row of RELATION_PROMPT images: ``passes[p][s]`` says whether seed s of prompt p passed."""
    spec = parse_prompt(RELATION_PROMPT)
    right = evaluate([found("red", "circle", 10, 32), found("blue", "square", 50, 32)], spec, RELATION_PROMPT)
    swapped = evaluate([found("red", "circle", 50, 32), found("blue", "square", 10, 32)], spec, RELATION_PROMPT)
    samples = [(p, s) for p, row in enumerate(passes) for s in range(len(row))]
    verdicts = [right if passes[p][s] else swapped for p, s in samples]
    result = category_result("relation", verdicts, 1.0, samples=samples)
    return ConfigurationResult(select_configurations([name])[0], {"relation": result})


def test_compare_pair_and_its_table_on_a_hand_made_case():
    full = relation_rows([[True, True], [True, False], [False, False]], "full")
    base = relation_rows([[False, True], [False, False], [False, False]], "base")
    assert pass_matrix(full.categories["relation"]) == [[True, True], [True, False], [False, False]]
    pair = ConfigurationPair("full", "base", "the whole method")
    comparison = compare_pair(full, base, pair)
    assert (
        comparison.categories["relation"]
        == comparison.all
        == paired_difference(pass_matrix(full.categories["relation"]), pass_matrix(base.categories["relation"]))
    )
    assert format_pairs_table([comparison]).splitlines() == [
        "| comparison | what it measures | relation (prompts=3, images=6) | all (prompts=3, images=6) |",
        "|---|---|---|---|",
        "| full - base | the whole method | +33.3 [-38.4, +100.0] | +33.3 [-38.4, +100.0] |",
    ]
    row = comparison.as_dict()
    assert (row["first"], row["second"], row["meaning"]) == ("full", "base", "the whole method")
    assert row["all"]["difference"] == pytest.approx(1 / 3) and row["all"]["images"] == 6
    # By default the pairs of default_pairs whose rows are both there.
    assert [c.pair for c in paired_comparisons([base, full])] == [default_pairs()[0]]
    assert paired_comparisons([base]) == []
    with pytest.raises(ValueError, match=r"not in the results: \['refl'\]"):
        paired_comparisons([full, base], [ConfigurationPair("full", "refl", "")])
    with pytest.raises(ValueError, match="no comparisons"):
        format_pairs_table([])


def test_compare_pair_refuses_rows_of_other_images():
    three = relation_rows([[True], [False], [True]], "full")
    two = relation_rows([[True], [False]], "base")
    with pytest.raises(ValueError, match="different prompts or seeds"):
        compare_pair(three, two)
    seeds = relation_rows([[True, False], [False, True], [True, True]], "base")
    with pytest.raises(ValueError, match="different prompts or seeds"):
        compare_pair(three, seeds)


def test_default_pairs_compare_re_weighting_over_the_same_unet():
    names = [(p.first, p.second) for p in default_pairs()]
    for needed in [("full", "base"), ("reweight-grounded", "base"), ("full", "refl")]:
        assert needed in names
    for needed in [("reweight-true-masks", "base"), ("refl", "base")]:
        assert needed in names
    # With the reward-ranked UNet in "full", re-weighting's own contribution is over that UNet.
    assert ("full", "ranked") in [(p.first, p.second) for p in default_pairs("unet-ranked")]
    assert ("full", "refl") not in [(p.first, p.second) for p in default_pairs("unet-ranked")]
    # Re-weighting's own contribution: the same UNet, re-weighting on in the first row and off in the second.
    for first, second in [("reweight-grounded", "base"), ("full", "refl")]:
        a, b = select_configurations([first, second])
        assert a.unet_subfolder == b.unet_subfolder and (a.realign, a.masks, b.realign) == (True, "grounder", False)
    ranked_full = [
        ConfigurationResult(c, {}) for c in select_configurations(["full", "ranked", "refl"], "unet-ranked")
    ]
    assert [(p.first, p.second) for p in pairs_for(ranked_full)] == [("full", "ranked")]
    with pytest.raises(ValueError, match="full_unet"):
        default_pairs("unet")


def test_run_evaluation_resumes_rows_from_their_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    settings = EvalSettings(prompts_per_category=1, num_inference_steps=1, seeds=1)
    configurations = select_configurations(["base", "reweight-true-masks"])
    first = run_evaluation(BUILTIN_WORLD, configurations, settings, progress=False, checkpoints=checkpoints)
    assert sorted(path.name for path in checkpoints.glob("*.json")) == ["base.json", "reweight-true-masks.json"]
    # A saved row is read back, not generated: a marker planted in its file comes back.
    saved = json.loads((checkpoints / "base.json").read_text())
    saved["categories"]["binding"]["passed"] = 99
    (checkpoints / "base.json").write_text(json.dumps(saved))
    (checkpoints / "reweight-true-masks.json").unlink()  # as if killed while drawing this row
    again = run_evaluation(BUILTIN_WORLD, configurations, settings, progress=False, checkpoints=checkpoints)
    assert again[0].categories["binding"].passed == 99
    assert again[0].categories["count"].records == first[0].categories["count"].records
    for category, samples in first[0].samples.items():
        for (image, passed), (back, back_passed) in zip(samples, again[0].samples[category], strict=True):
            assert np.array_equal(np.asarray(image), np.asarray(back)) and passed == back_passed
    # The row without a checkpoint is drawn again, to the same verdicts, and saved.
    assert [r.records for r in again[1].categories.values()] == [r.records for r in first[1].categories.values()]
    assert (checkpoints / "reweight-true-masks.json").is_file()
    # Other settings do not match the checkpoint (the batch size aside): the row is drawn again.
    other = run_evaluation(
        BUILTIN_WORLD,
        configurations[:1],
        EvalSettings(prompts_per_category=1, num_inference_steps=2, seeds=1),
        progress=False,
        checkpoints=checkpoints,
    )
    assert other[0].categories["binding"].passed <= 1
    assert checkpoint_key(BUILTIN_WORLD, configurations[0], settings) == checkpoint_key(
        BUILTIN_WORLD,
        configurations[0],
        EvalSettings(prompts_per_category=1, num_inference_steps=1, seeds=1, batch_size=3),
    )


def test_checkpoint_key_changes_with_the_unet_files(tmp_path):
    world = copy_world(tmp_path / "world")
    base = select_configurations(["base"])[0]
    before = checkpoint_key(world, base, EvalSettings())
    assert set(before["unet_files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    config = world / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert checkpoint_key(world, base, EvalSettings())["unet_files"] != before["unet_files"]
    assert checkpoint_key(world, base, EvalSettings(seeds=2))["settings"]["seeds"] == 2
