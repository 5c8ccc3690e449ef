import json

import numpy as np
import PIL.Image
import pytest

from realign_pipeline import cli
from realign_pipeline.cli import build_parser, main, read_prompts


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


def test_demo_says_which_model_it_used(tmp_path, capsys):
    main(["demo", "--output", str(tmp_path / "demo"), "--steps", "2"])
    printed = capsys.readouterr().out
    assert "demo model: the shapes world" in printed
    assert printed.count("judge, coarse:") == 4 and printed.count("judge, final:") == 4
    records = json.loads((tmp_path / "demo" / "layouts.json").read_text())
    assert len(records) == 4 and all(record["regions"] for record in records)
    assert (tmp_path / "demo" / "panel.png").exists()


def test_prompts_are_required():
    with pytest.raises(SystemExit, match="at least one --prompt"):
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

    monkeypatch.setattr(cli, "load_captioner", recording_load_captioner)
    with pytest.raises(Stop):
        main(GENERATE + ["--llm-timeout", "7.5", "--llm-max-retries", "2", "--llm-base-url", "http://127.0.0.1:9/v1"])
    assert received["name"] == "openai"
    assert (received["timeout"], received["max_retries"]) == (7.5, 2)
    assert received["base_url"] == "http://127.0.0.1:9/v1"
