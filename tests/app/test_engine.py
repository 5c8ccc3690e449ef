"""The app's pipeline side on the built-in shapes world: a draft is the pipeline's coarse pass and layout, a fine
pass from a layout starts from the draft's noise, edits change the image, and concurrent sessions keep theirs."""

import argparse
import dataclasses
import threading

import numpy as np
import pytest
import torch

from realign_pipeline.app.command import SHAPES_WORLD, add_app_parser, load_engine, run_app
from realign_pipeline.app.session import RealignSettings, add_region, box_mask, check_draft_settings, delete_region
from realign_pipeline.errors import UsageError

PROMPT = "a yellow triangle and a blue circle"
STEPS = 8

pytestmark = pytest.mark.skipif(
    not (SHAPES_WORLD / "model_index.json").exists(), reason="the shapes world's weights are not in this checkout"
)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def engine():
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers())
    return load_engine(parser.parse_args(["app", "--device", "cpu", "--dtype", "float32"]))


@pytest.fixture(scope="module")
def draft(engine):
    return engine.draft(check_draft_settings(PROMPT, 5, STEPS, 4.0, 1.0))


def test_the_command_defaults_to_the_shapes_world_on_loopback():
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers())
    args = parser.parse_args(["app"])
    assert (args.run, args.model, args.host, args.grounder) == (run_app, None, "127.0.0.1", None)
    with pytest.raises(UsageError, match="--port 70000: must be in 0..65535"):
        run_app(parser.parse_args(["app", "--port", "70000"]))  # refused before any model loads
    with pytest.raises(UsageError, match="`sam_checkpoint` is required"):
        load_engine(parser.parse_args(["app", "--grounder", "segment-anything"]))  # before any model loads


def test_the_default_engine_is_the_world_with_its_refl_unet_and_grounder(engine, draft):
    assert engine.judge_prompts and engine.image_size() == (64, 64)
    assert type(engine.pipe.grounder).__name__ == "ShapesGrounder"
    assert {r.source for r in draft.layout.regions} <= {"shapes-palette", "attention"}
    assert [r.caption for r in draft.layout.regions] == ["a yellow triangle", "a blue circle"]


def test_a_draft_runs_the_coarse_pass_and_one_fine_step(engine):
    calls = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        engine.draft(check_draft_settings(PROMPT, 5, STEPS, 4.0, 1.0))
    finally:
        handle.remove()
    assert len(calls) == STEPS + 1


def test_realigning_the_drafted_layout_is_the_pipelines_own_full_call(engine, draft):
    full = engine.pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(5),
        coarse_stop_fraction=1.0,
    )
    assert np.array_equal(pixels(full.coarse_images[0]), pixels(draft.coarse_image))
    assert np.array_equal(pixels(full.images[0]), pixels(engine.realign(draft.layout).final_image))


def test_without_regions_the_fine_pass_is_plain_stable_diffusion_from_the_same_noise(engine, draft):
    plain = engine.pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(5),
        realign=False,
    )
    empty = dataclasses.replace(draft.layout, regions=())
    assert np.abs(pixels(plain.images[0]) - pixels(engine.realign(empty).final_image)).max() <= 1


def test_an_edit_changes_the_final_image(engine, draft):
    before = pixels(engine.realign(draft.layout).final_image)
    deleted = np.abs(pixels(engine.realign(delete_region(draft.layout, 2)).final_image) - before).max(axis=-1)
    assert (deleted > 30).sum() >= 5  # at least a few pixels: how far the world follows is measured elsewhere
    moved = add_region(delete_region(draft.layout, 2), "a blue circle", box_mask(64, 64, (4, 4, 28, 28)), "box")
    strong = dataclasses.replace(moved, realign=RealignSettings(1.0, 2.0, 1.0, 1.0))
    with pytest.warns(UserWarning, match="`cross_attention_weight`=2.0 > 1"):
        final = engine.realign(strong).final_image
    inside = np.abs(pixels(final) - before)[4:28, 4:28].max(axis=-1)
    assert (inside > 60).mean() > 0.2  # a strong box region draws an object inside the box


def test_the_caption_check_is_the_pipelines_own_error(engine):
    engine.check_caption(PROMPT, "the blue circle")
    with pytest.raises(
        ValueError, match=r"the caption 'a purple cat' cannot be placed: its words \['purple', 'cat'\]"
    ):
        engine.check_caption(PROMPT, "a purple cat")


def test_two_sessions_realigning_at_once_each_get_their_own_layouts_image(engine, draft):
    layouts = [draft.layout, delete_region(draft.layout, 1)]
    alone = [pixels(engine.realign(layout).final_image) for layout in layouts]
    together: list = [None, None]

    def run(index: int) -> None:
        together[index] = pixels(engine.realign(layouts[index]).final_image)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert not np.array_equal(alone[0], alone[1])


def test_the_judge_gives_a_verdict_on_shapes_prompts_only(engine, draft):
    assert engine.verdict(draft.coarse_image, PROMPT).split(" ")[0] in {"PASS", "fail"}
    assert engine.verdict(draft.coarse_image, "a photo of a cat").startswith("not judged: ")


def test_any_stable_diffusion_folder_loads_with_the_attention_grounder_and_no_judge(toy_pipeline_folder):
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers())
    toy = load_engine(parser.parse_args(["app", "--model", str(toy_pipeline_folder), "--dtype", "float32"]))
    assert not toy.judge_prompts and toy.pipe.grounder is None
    draft = toy.draft(check_draft_settings("a red book and a yellow vase", 0, 2, 7.5, 1.0))
    assert [(r.caption, r.source) for r in draft.layout.regions] == [
        ("a red book", "attention"),
        ("a yellow vase", "attention"),
    ]
    assert toy.verdict(draft.coarse_image, "a red book and a yellow vase") is None
    assert toy.realign(draft.layout).final_image.size == (draft.layout.width, draft.layout.height)
