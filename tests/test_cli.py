import json

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.captioners import factory as captioner_factory
from realign_pipeline.cli import build_parser, main, read_prompts
from realign_pipeline.errors import UsageError


def test_generate_writes_images_masks_layouts_and_panel(toy_pipeline_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red book and a yellow vase\n\na green cat\n")
    out = tmp_path / "out"
    main(
        [
            "generate",
            "--model",
            str(toy_pipeline_folder),
            "--prompts-file",
            str(prompts),
            "--output",
            str(out),
            "--steps",
            "2",
            "--coarse-stop-fraction",
            "1.0",
        ]
    )
    records = json.loads((out / "layouts.json").read_text())
    assert [r["prompt"] for r in records] == ["a red book and a yellow vase", "a green cat"]
    assert [region["caption"] for region in records[0]["regions"]] == ["a red book", "a yellow vase"]
    mask = np.asarray(PIL.Image.open(out / records[0]["regions"][0]["mask"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert PIL.Image.open(out / "panel.png").width == 4 * 192
    assert (out / "000-coarse.png").exists() and (out / "001-final.png").exists()


def test_demo_says_which_model_it_used(tmp_path, capsys, monkeypatch):
    from realign_pipeline.shapes import layout_control

    layout_calls = []

    def recording_draw_layout_demo(*args, **kwargs):
        layout_calls.append(kwargs)
        return real_draw_layout_demo(*args, **kwargs)

    real_draw_layout_demo = layout_control.draw_layout_demo
    monkeypatch.setattr(layout_control, "draw_layout_demo", recording_draw_layout_demo)
    main(["demo", "--output", str(tmp_path / "demo"), "--steps", "2"])
    # The layout panel runs at the world's settings from its model card, not DenseDiffusion's SD defaults.
    settings = {"guidance_scale": 2.0, "cross_attention_weight": 1.0, "self_attention_weight": 1.0}
    assert layout_calls == [{**settings, "modulation_fraction": 0.6}]
    printed = capsys.readouterr().out
    assert "demo model: the shapes world" in printed
    assert printed.count("judge, coarse:") == 4 and printed.count("judge, final:") == 4
    records = json.loads((tmp_path / "demo" / "layouts.json").read_text())
    assert len(records) == 4 and all(record["regions"] for record in records)
    assert (tmp_path / "demo" / "panel.png").exists()
    # Layout control on one prompt: its halves and their swap, each judged plain and re-weighted.
    assert printed.count("layout control, ") == 2 and printed.count("halves swapped:") == 1
    assert printed.count("judge, plain: in-region share") == 2 and printed.count("judge, re-weighted:") == 2
    assert PIL.Image.open(tmp_path / "demo" / "layout-panel.png").width == 4 * 192


def test_prompts_are_required():
    with pytest.raises(UsageError, match="at least one --prompt"):
        read_prompts(None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate"])


def test_generate_with_grounding_sam_by_name(toy_pipeline_folder, tmp_path):
    from tests.grounding.tiny_grounding_models import save_tiny_grounding_dino, save_tiny_sam

    detector = save_tiny_grounding_dino(tmp_path / "dino")
    segmenter = save_tiny_sam(tmp_path / "sam")
    out = tmp_path / "out"
    main(
        [
            "generate",
            "--model",
            str(toy_pipeline_folder),
            "--prompt",
            "a red book and a yellow vase",
            "--output",
            str(out),
            "--steps",
            "2",
            "--grounder",
            "grounding-sam",
            "--detector",
            str(detector),
            "--segmenter",
            str(segmenter),
            "--box-threshold",
            "0",
            "--text-threshold",
            "0",
        ]
    )
    records = json.loads((out / "layouts.json").read_text())
    sources = {region["source"] for region in records[0]["regions"]}
    assert sources <= {"grounding-dino+sam", "attention"} and "grounding-dino+sam" in sources


GENERATE = ["generate", "--model", "some/model", "--prompt", "a red book", "--captioner", "openai"]


def test_llm_timeout_and_retries_flags_are_parsed_with_defaults():
    args = build_parser().parse_args(GENERATE + ["--llm-timeout", "2.5", "--llm-max-retries", "0"])
    assert (args.llm_timeout, args.llm_max_retries) == (2.5, 0)
    args = build_parser().parse_args(GENERATE)
    assert (args.llm_timeout, args.llm_max_retries) == (60.0, 4)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--llm-timeout", "0", "must be a finite number > 0, got '0'"),
        ("--llm-timeout", "-3", "must be a finite number >= 0, got '-3'"),
        ("--llm-timeout", "inf", "must be a finite number >= 0, got 'inf'"),
        ("--llm-timeout", "soon", "must be a number, got 'soon'"),
        ("--llm-max-retries", "-1", "must be an integer >= 0, got -1"),
        ("--llm-max-retries", "1.5", "must be an integer >= 0, got '1.5'"),
    ],
)
def test_llm_timeout_and_retries_flags_are_validated(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(GENERATE + [flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_generate_passes_the_llm_flags_to_load_captioner(monkeypatch):
    received = {}

    class Stop(Exception):
        pass

    def recording_load_captioner(name, **options):
        received.update(options, name=name)
        raise Stop  # before any model loads

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setattr(captioner_factory, "load_captioner", recording_load_captioner)
    with pytest.raises(Stop):
        main(GENERATE + ["--llm-timeout", "7.5", "--llm-max-retries", "2", "--llm-base-url", "http://127.0.0.1:9/v1"])
    assert received["name"] == "openai"
    assert (received["timeout"], received["max_retries"]) == (7.5, 2)
    assert received["base_url"] == "http://127.0.0.1:9/v1"


# -- a user's mistake ends in one line, exit status 2, and nothing written ---------------------------------------


def fails_with(capsys, argv, message, *absent):
    """``realign argv`` exits with status 2 and exactly ``realign <command>: error: <message>`` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(message), err
    assert "Traceback" not in err
    for path in absent:
        assert not path.exists(), f"{path} was written"
    return err


def generate(model, tmp_path, *extra):
    return ["generate", "--model", str(model), "--prompt", "a red book", "--output", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--steps", "-3"], "argument --steps: must be a positive integer, got -3"),
        (["--height", "100"], "argument --height: must be a positive multiple of 8, got 100 (try 96)"),
        (["--width", "0"], "argument --width: must be a positive multiple of 8, got 0"),
        (["--guidance-scale", "-1"], "argument --guidance-scale: must be a finite number >= 0, got '-1'"),
        (["--coarse-stop-fraction", "0"], "argument --coarse-stop-fraction: must be in (0, 1], got '0'"),
        (["--box-threshold", "1.5"], "argument --box-threshold: must be in [0, 1], got '1.5'"),
        (
            ["--dtype", "float8"],
            "argument --dtype: invalid choice: 'float8' (choose from 'float32', 'float16', 'bfloat16')",
        ),
    ],
)
def test_generate_rejects_bad_numbers_by_name(extra, message, tmp_path, capsys):
    fails_with(capsys, generate("some/model", tmp_path, *extra), message, tmp_path / "out")


def test_generate_checks_files_devices_and_keys_before_any_model_loads(
    toy_pipeline_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    fails_with(
        capsys,
        generate(missing, tmp_path),
        f"--model {missing}: no such folder (and not a Hub repo id such as owner/name)",
        out,
    )
    fails_with(
        capsys,
        generate(tmp_path, tmp_path),
        f"--model {tmp_path}: the folder has no model_index.json (not a diffusers folder)",
        out,
    )
    prompts = tmp_path / "prompts.txt"
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--prompts-file", str(prompts)),
        f"--prompts-file {prompts}: no such file (a text file with one prompt per line)",
        out,
    )
    prompts.write_text("\n  \n")
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--prompts-file", str(prompts)),
        f"--prompts-file {prompts}: the file holds no prompts (one prompt per line)",
        out,
    )
    unet = tmp_path / "no-such-unet"
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--realign-unet", str(unet)),
        f"--realign-unet {unet}: no such folder (and not a Hub repo id such as owner/name)",
        out,
    )
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"),
        "CUDA device(s)"
        if torch.cuda.is_available()
        else "--device cuda: CUDA is not available on this machine; use --device cpu",
        out,
    )
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--device", "gpu0"),
        "--device gpu0: not a torch device (e.g. cpu, cuda, cuda:1, mps)",
        out,
    )
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--captioner", "openai"),
        "--captioner openai: the openai captioner needs an API key: set $OPENAI_API_KEY "
        "(for a server without authentication, any non-empty string)",
        out,
    )
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--grounder", "segment-anything"),
        "--grounder segment-anything: `sam_checkpoint` is required for the 'segment-anything' grounder "
        "(a SAM .pth file).",
        out,
    )
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--image-captioner", "Salesforce/blip2-opt-2.7b"),
        "--image-captioner: only the openai captioner reads one; add --captioner openai",
        out,
    )
    detector = tmp_path / "no-dino"
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--grounder", "grounding-sam", "--detector", str(detector)),
        f"--detector {detector}: no such folder (and not a Hub repo id such as owner/name)",
        out,
    )
    out.write_text("a file")
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path),
        f"--output {out}: a file is in the way; name a folder (it is created if missing)",
    )


def test_generate_names_a_model_it_cannot_load(toy_pipeline_folder, tmp_path, capsys, monkeypatch):
    # Hub-like names that are neither local folders nor in the cache (the tests run with HF_HUB_OFFLINE=1).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    fails_with(
        capsys,
        generate(toy_pipeline_folder, tmp_path, "--realign-unet", "outputs/refl-run"),
        "--realign-unet outputs/refl-run: cannot load it (HF_HUB_OFFLINE is set and it is not in the local cache)",
        out,
    )
    fails_with(
        capsys,
        generate("someone/no-such-model", tmp_path),
        "--model someone/no-such-model: cannot load it (HF_HUB_OFFLINE is set and it is not in the local cache)",
        out,
    )


def test_generate_takes_a_folder_that_is_the_unet_itself(toy_pipeline_folder, tmp_path):
    out = tmp_path / "out"
    main(generate(toy_pipeline_folder, tmp_path, "--realign-unet", str(toy_pipeline_folder / "unet"), "--steps", "1"))
    assert (out / "000-final.png").exists()


def test_demo_and_eval_reject_bad_arguments(tmp_path, capsys):
    fails_with(capsys, ["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0")
    (tmp_path / "file").write_text("x")
    fails_with(
        capsys,
        ["demo", "--output", str(tmp_path / "file")],
        "a file is in the way; name a folder (it is created if missing)",
    )
    err = fails_with(
        capsys,
        ["eval", "--configurations", "base", "nonsense", "--output", str(tmp_path / "eval")],
        "",
        tmp_path / "eval",
    )
    assert err.startswith("realign eval: error: --configurations: unknown configuration(s) ['nonsense']; expected")
    fails_with(capsys, ["eval", "--full-unet", "unet-x"], "--full-unet unet-x: must be one of unet-refl, unet-ranked")


def test_help_imports_neither_torch_nor_diffusers_and_prints_no_warning():
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from realign_pipeline.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['train', '--help'], ['world', 'finetune', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, argv\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers', 'accelerate') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert done.stderr == ""  # no warning of any kind
    assert "world" in done.stdout and "finetune" in done.stdout

    realign = os.path.join(os.path.dirname(sys.executable), "realign")  # the console script users run
    done = subprocess.run([realign, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and "{generate,demo,eval,train,push,world,app}" in done.stdout


def test_a_mistake_through_the_console_script_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    realign = os.path.join(os.path.dirname(sys.executable), "realign")
    done = subprocess.run(
        [realign, "train", "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == f"realign train: error: {tmp_path / 'run.yaml'}: no such file\n"
    done = subprocess.run(
        [sys.executable, "-m", "realign_pipeline.cli", "generate", "--model", "m/m", "--prompt", "x", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        "realign generate: error: argument --steps: must be a positive integer, got 0"
    )
