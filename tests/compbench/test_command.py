"""``realign eval --benchmark t2i-compbench`` end to end on tiny models: names, report, resume, two processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realign_pipeline.compbench.command import build_parser, run_compbench_eval
from realign_pipeline.errors import UsageError

CATEGORIES = ["color", "spatial", "non_spatial", "complex"]


def arguments(model, scorers, output, extra=()):
    return [
        "--model", str(model), "--realign-unet", str(model),
        "--categories", *CATEGORIES, "--compbench-prompts", "2", "--images-per-prompt", "2",
        "--compbench-configurations", "base", "reweight-attention", "finetuned",
        "--steps", "2", "--guidance-scale", "3", "--seed", "5", "--negative-prompt", "blurry",
        "--phrase-parser", "rule", "--vqa-model", str(scorers["vqa"]), "--clip-model", str(scorers["clip"]),
        "--detector-model", str(scorers["detector"]), "--box-threshold", "0", "--text-threshold", "0",
        "--output", str(output), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def run(model, scorers, output):
    return run_compbench_eval(build_parser().parse_args(arguments(model, scorers, output)))


def files_of(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted((output / "images").rglob("*.png"))}


def results_of(output: Path) -> dict:
    return json.loads((output / "scores.json").read_text())["results"]


@pytest.fixture(scope="module")
def reference(toy_pipeline_folder, scorer_folders, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    outcome = run(toy_pipeline_folder, scorer_folders, output)
    return output, outcome


def test_images_are_named_as_the_official_scripts_expect_and_every_row_starts_from_the_same_noise(reference):
    output, outcome = reference
    assert outcome["drawn"] == 3 * 4 * 2 * 2 and outcome["scored"] == 3 * 4 * 2
    files = files_of(output)
    assert len(files) == 48
    prompt = "a blue bench and a green bowl"  # the second colour prompt: images 2 and 3 of the category
    assert f"images/base/color/samples/{prompt}_000002.png" in files
    assert f"images/finetuned/color/samples/{prompt}_000003.png" in files
    # finetuned loads the same UNet here: from the same noise it must draw the same image as base
    assert (
        files[f"images/base/color/samples/{prompt}_000002.png"]
        == files[f"images/finetuned/color/samples/{prompt}_000002.png"]
    )
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["settings"]["negative_prompt"] == "blurry" and manifest["settings"]["guidance_scale"] == 3
    assert manifest["scheduler"]["class"] and "diffusers" in manifest["versions"]
    record = json.loads((output / "scores/base/color/0001.json").read_text())
    assert [image["file"] for image in record["images"]] == [f"{prompt}_000002.png", f"{prompt}_000003.png"]
    assert set(record["images"][0]["details"]["questions"]) == {"a blue bench?", "a green bowl?"}


def test_report_has_scores_with_intervals_and_an_html_page_beside_the_published_figures(reference):
    output, _ = reference
    results = results_of(output)
    assert set(results) == {"base", "reweight-attention", "finetuned"}
    color = results["base"]["color"]
    assert color["n_prompts"] == 2 and color["n_images"] == 4
    means = [p["mean"] for p in color["prompts"]]
    assert color["score"] == pytest.approx(sum(means) / 2)
    low, high = color["ci95"]
    assert low <= color["score"] <= high
    for summary in results["base"]["complex"]["prompts"][0]["images"]:
        assert summary["details"]["subcategory"] == "spatial"  # "The red hat was on top of the brown coat rack."
    table = (output / "table.md").read_text()
    assert table.startswith("| configuration | color (n=2×2) |")
    page = (output / "report.html").read_text()
    assert "SD 1.5 (published)" in page and "a%20blue%20bench%20and%20a%20green%20bowl_000002.png" in page


def test_a_finished_run_resumes_without_work_and_a_removed_image_and_score_are_redone(
    reference, toy_pipeline_folder, scorer_folders, tmp_path
):
    output, _ = reference
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(output), str(copy)], check=True)
    again = run(toy_pipeline_folder, scorer_folders, copy)
    assert (again["drawn"], again["scored"]) == (0, 0)
    (copy / "images/reweight-attention/spatial/samples/a giraffe next to a lamp_000001.png").unlink()
    (copy / "scores/reweight-attention/spatial/0000.json").unlink()
    again = run(toy_pipeline_folder, scorer_folders, copy)
    assert (again["drawn"], again["scored"]) == (1, 1)
    assert files_of(copy) == files_of(output) and results_of(copy) == results_of(output)


def test_a_resumed_run_with_other_settings_is_refused(reference, toy_pipeline_folder, scorer_folders):
    output, _ = reference
    args = build_parser().parse_args(arguments(toy_pipeline_folder, scorer_folders, output, ["--steps", "3"]))
    with pytest.raises(UsageError, match="num_inference_steps: 2 there, 3 now"):
        run_compbench_eval(args)


def test_bad_arguments_fail_before_any_model_loads(scorer_folders, tmp_path):
    args = build_parser().parse_args(arguments(tmp_path / "no-model", scorer_folders, tmp_path / "out"))
    args.realign_unet = None
    with pytest.raises(UsageError, match=r"\['finetuned'\] need a fine-tuned UNet: give --realign-unet"):
        run_compbench_eval(args)
    assert not (tmp_path / "out").exists()


def environment(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}  # fmt: skip


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_killed_run_restarted_with_the_same_command_ends_as_an_uninterrupted_one(
    reference, toy_pipeline_folder, scorer_folders, tmp_path
):
    output = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "realign_pipeline.compbench",
        *arguments(toy_pipeline_folder, scorer_folders, output),
    ]
    process = subprocess.Popen(
        command, env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(output.rglob("*.png"))) < 5:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*.png")}
    assert 5 <= len(before) < 48, "the run was not killed part way"
    # The kill lands in the middle of a PNG write only sometimes; plant the file such a kill leaves.
    half_written = next(iter(before)).with_name(".a half-written image_000099.png.4242.partial")
    half_written.write_bytes(b"\x89PNG")
    outcome = run(toy_pipeline_folder, scorer_folders, output)
    assert outcome["drawn"] == 48 - len(before)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished images were not redrawn
    assert not list(output.rglob("*.partial"))
    assert files_of(output) == files_of(reference[0]) and results_of(output) == results_of(reference[0])


@pytest.mark.slow
def test_two_cpu_processes_draw_disjoint_shards_and_merge_to_the_single_process_result(
    reference, toy_pipeline_folder, scorer_folders, tmp_path
):
    output = tmp_path / "two"
    # As tests/training/test_multiprocess.py: --multi_gpu spawns through torch.distributed.run and
    # ACCELERATE_USE_CPU makes each process set up gloo instead of looking for GPUs.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "realign_pipeline.compbench", *arguments(toy_pipeline_folder, scorer_folders, output),
    ]  # fmt: skip
    log = tmp_path / "launch.log"
    with log.open("w") as handle:
        completed = subprocess.run(
            command, env=environment(tmp_path), stdout=handle, stderr=subprocess.STDOUT, timeout=400
        )
    assert completed.returncode == 0, log.read_text()[-4000:]
    assert json.loads((output / "manifest.json").read_text())["num_processes"] == 2
    assert files_of(output) == files_of(reference[0])
    assert results_of(output) == results_of(reference[0])


def test_realign_eval_dispatches_to_the_harness_with_its_defaults(tmp_path, capsys, monkeypatch):
    from realign_pipeline import cli

    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--benchmark", "t2i-compbench", "--output", str(output)])
    assert exit_info.value.code == 2 and "--model: give a Stable Diffusion repo id" in capsys.readouterr().err
    assert not output.exists()
    seen = {}
    monkeypatch.setattr("realign_pipeline.compbench.command.run_compbench_eval", lambda args: seen.update(vars(args)))
    cli.main(["eval", "--benchmark", "t2i-compbench", "--model", "m"])
    # T2I-CompBench's own generation settings, and no device forced: accelerate's device per process.
    assert (seen["steps"], seen["guidance_scale"], seen["device"]) == (50, 7.5, None)
    cli.main(["eval", "--benchmark", "t2i-compbench", "--model", "m", "--steps", "20", "--guidance-scale", "0"])
    assert (seen["steps"], seen["guidance_scale"]) == (20, 0.0)


def test_the_spacy_parser_is_checked_before_any_image_is_drawn(tmp_path, capsys):
    from realign_pipeline import cli

    # Wherever spaCy or its English model is missing (as here, offline), the error says how to get them.
    try:
        import spacy

        spacy.load("en_core_web_sm")
        pytest.skip("spaCy's en_core_web_sm is installed here: there is nothing to refuse")
    except (ImportError, OSError):
        pass
    output = tmp_path / "out"
    model = str(tmp_path / "no-model")
    arguments = ["eval", "--benchmark", "t2i-compbench", "--model", model, "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*arguments, "--phrase-parser", "spacy", "--categories", "color", "--compbench-prompts", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--phrase-parser spacy needs spaCy and its English model" in error
    assert "--phrase-parser rule" in error and not output.exists()
