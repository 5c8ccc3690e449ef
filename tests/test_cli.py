import json

import numpy as np
import PIL.Image
import pytest

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
