"""Fine-tuning the shapes world's UNet: tiny runs of both methods on a copy of the committed world."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.shapes import finetune as ft
from realign_pipeline.shapes.data import HELD_OUT_PAIRS, development_prompts, evaluation_prompts, parse_prompt

WEIGHTS = "diffusion_pytorch_model.safetensors"

# A few seconds per run: few sampling steps, one prompt per batch, two validation prompts.
TINY_SHARED = [
    "num_inference_steps=4",
    "num_validation_prompts=2",
    "train_batch_size=1",
    "checkpointing_steps=1",
    "learning_rate=1e-3",
]
TINY_REFL = TINY_SHARED + ["refl_step_range=[2, 4]", "pretrain_batch_size=1", "max_train_steps=2"]
TINY_RANKED = TINY_SHARED + [
    "ranked_rounds=1",
    "ranked_samples_per_prompt=2",
    "ranked_prompts_per_round=2",
    "ranked_epochs_per_round=1",
]


@pytest.fixture
def world(tmp_path):
    """A copy of the committed world (the real one is never written to)."""
    copy = tmp_path / "world"
    shutil.copytree(ft.WORLD, copy, ignore=shutil.ignore_patterns("unet-*", "*.png"))
    return copy


def run(method, world, work_dir, settings, *extra):
    argv = ["--method", method, "--world", str(world), "--work-dir", str(work_dir), "--num-threads", "1"]
    argv += ["--regularizer-images", "8", *map(str, extra)]
    for setting in settings:
        argv += ["--set", setting]
    return ft.main(argv)


def assert_float16_file(folder):
    with safe_open(str(Path(folder) / WEIGHTS), "pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes == {torch.float16}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def test_refl_run_exports_a_float16_unet_the_pipeline_loads(world, tmp_path):
    result = run("refl", world, tmp_path / "work", TINY_REFL)

    export = world / "unet-refl"
    assert result.export == export and result.train_result.finished and result.train_result.global_step == 2
    assert_float16_file(export)
    base = load_file(world / "unet" / WEIGHTS)
    tuned = load_file(export / WEIGHTS)
    assert max_difference(base, tuned) > 1e-3  # trained, not a copy of the base

    pipe = RealignDiffPipeline.from_pretrained(world, realign_unet=world, realign_unet_subfolder="unet-refl")
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[key], tuned[key].float()) for key in tuned)

    card = (export / "README.md").read_text()
    assert "--method refl" in card and "| before | 0 |" in card and "| after | 2 |" in card
    assert json.loads(card.split("```json\n")[1].split("```")[0])["pretrained_model"] == str(world)


def test_refl_data_keeps_evaluation_prompts_and_held_out_pairs_out(world, tmp_path):
    work = tmp_path / "work"
    run("refl", world, work, TINY_REFL)

    training = (work / "prompts.txt").read_text().splitlines()
    validation = (work / "validation_prompts.txt").read_text().splitlines()
    assert len(validation) == ft.VALIDATION_PER_CATEGORY * 4 * ft.VALIDATION_SEEDS
    assert len(set(validation)) == ft.VALIDATION_PER_CATEGORY * 4 and not set(validation) & set(training)
    assert {parse_prompt(p).category for p in validation} == {"single", "binding", "relation", "count"}
    evaluated = {
        p for c in ("binding", "relation", "count") for s in ("seen", "held_out") for p in evaluation_prompts(c, s, 96)
    }
    assert not evaluated & (set(training) | set(validation))
    # Validation is the development split (never an evaluation prompt), in a fixed order, each prompt twice in a row.
    assert validation[:: ft.VALIDATION_SEEDS] == development_prompts(ft.VALIDATION_PER_CATEGORY)
    assert validation[1 :: ft.VALIDATION_SEEDS] == validation[:: ft.VALIDATION_SEEDS]

    records = [json.loads(line) for line in (work / "regularizer" / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 8
    drawn = {pair for record in records for pair in parse_prompt(record["text"]).pairs}
    assert not drawn & HELD_OUT_PAIRS  # the UNet never sees a held-out pairing drawn


def test_reward_ranked_run_exports_the_round_it_kept(world, tmp_path):
    result = run("reward_ranked", world, tmp_path / "work", TINY_RANKED)

    export = world / "unet-ranked"
    assert result.export == export and result.train_result.finished
    assert_float16_file(export)
    base = load_file(world / "unet" / WEIGHTS)
    trained = load_file(tmp_path / "work" / "run" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert max_difference(base, trained) > 1e-3  # the round trained
    # The trainer keeps the round with the best validation reward, the base (round 0) included, and
    # the export is that round in float16: the trained weights, or the base unchanged.
    best_round = result.train_result.extra["best_round"]
    kept = load_file(tmp_path / "work" / "run" / "best" / "trainable.safetensors")
    tuned = load_file(export / WEIGHTS)
    assert all(torch.equal(tuned[key], kept[key].half()) for key in kept)
    assert (max_difference(base, tuned) > 1e-3) == (best_round == 1)
    assert f"Kept round {best_round}" in (export / "README.md").read_text()

    pipe = RealignDiffPipeline.from_pretrained(world, realign_unet=world, realign_unet_subfolder="unet-ranked")
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[key], tuned[key].float()) for key in tuned)


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(world, tmp_path):
    stopped = run("refl", world, tmp_path / "work", TINY_REFL + ["stop_after_steps=1"], "--export-to", tmp_path / "a")
    assert stopped.export is None and not stopped.train_result.finished
    assert not (tmp_path / "a" / "unet-refl").exists()
    assert (tmp_path / "work" / "run" / "checkpoints" / "checkpoint-1").is_dir()

    resumed = run("refl", world, tmp_path / "work", TINY_REFL, "--export-to", tmp_path / "a")
    assert resumed.train_result.finished and resumed.train_result.global_step == 2
    assert "resumed from `checkpoint-1`" in (resumed.export / "README.md").read_text()

    straight = run("refl", world, tmp_path / "straight", TINY_REFL, "--export-to", tmp_path / "b")
    assert max_difference(load_file(resumed.export / WEIGHTS), load_file(straight.export / WEIGHTS)) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "dpo"], "invalid choice: 'dpo'"),
        (
            ["--method", "refl", "--set", "learning_rat=1e-4"],
            "--set: unknown option 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        (
            ["--method", "refl", "--set", "refl_step_range=[20, 30]"],
            "--set: refl_step_range must be [start, end] with 0 <= start < end <= num_inference_steps (25), "
            "got [20, 30]",
        ),
        (["--method", "refl", "--set", "learning_rate=0"], "--set: learning_rate must be a number > 0, got 0"),
        (["--method", "refl", "--world", "no-such-world"], "--world no-such-world: not a diffusers pipeline folder"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ft.main([*argv, "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_defaults_follow_the_world_sampler():
    config = ft.build_config("refl", ft.WORLD, "work")
    scheduler = json.loads((ft.WORLD / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and config.sampler == "ddim"
    assert (config.resolution, config.use_lora) == (64, False)
    assert config.rewards[0]["model"] == str(ft.WORLD / "captioner")
    assert ft.build_config("reward_ranked", ft.WORLD, "work").pretrain_data is None
