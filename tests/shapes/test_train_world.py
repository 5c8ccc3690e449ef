"""A smoke run of the world's training script at toy size: it writes a loadable pipeline and resumes."""

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from transformers import BlipForConditionalGeneration, BlipProcessor

from realign_pipeline.shapes import train_world as tw
from realign_pipeline.shapes.data import EVAL_CATEGORIES, EVAL_PROMPTS_PER_CATEGORY, evaluation_prompts, make_sample

TINY = dict(
    num_images=64,
    num_captioner_images=32,
    vae_steps=2,
    unet_steps=2,
    captioner_steps=2,
    checkpoint_every=1,
    log_every=1,
    eval_prompts_per_category=1,
    eval_steps=2,
    vae_channels=(16, 16, 16),
    unet_channels=(16, 16, 16),
    unet_heads=(1, 1, 1),
    text_hidden_size=16,
    text_layers=1,
    captioner_hidden_size=16,
    captioner_layers=1,
    vae_batch_size=4,
    unet_batch_size=4,
    captioner_batch_size=4,
    warmup_steps=1,
    num_threads=1,  # toy models gain nothing from a second thread, and the test process may share the CPU
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, built by the command a user runs: ``realign world train --output ... --config tiny.yaml``."""
    from realign_pipeline.cli import main

    folder = tmp_path_factory.mktemp("world")
    output = folder / "shapes-world"
    options = folder / "tiny.yaml"
    options.write_text(
        "".join(f"{key}: {list(value) if isinstance(value, tuple) else value}\n" for key, value in TINY.items())
    )
    argv = ["--output", str(output), "--config", str(options)]
    main(["world", "train", *argv])
    config = tw.parse_args(argv)
    assert config == tw.WorldConfig(output_dir=str(output), **TINY)
    return config, json.loads((output / "training_info.json").read_text())


def test_world_folder_loads_as_plain_stable_diffusion(world):
    config, info = world
    folder = config.output_dir
    assert json.loads((tw.Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32  # stored in float16
    with safe_open(f"{folder}/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert pipe.vae.config.scaling_factor == pytest.approx(info["stages"]["vae"]["scaling_factor"])
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 64, 64, 3)
    card = (tw.Path(folder) / "README.md").read_text()
    assert "Held out" in card and "StableDiffusionPipeline" in card and "| development/binding |" in card
    assert (tw.Path(folder) / "samples.png").exists()


def test_captioner_loads_with_its_processor(world):
    config, _ = world
    folder = f"{config.output_dir}/captioner"
    model = BlipForConditionalGeneration.from_pretrained(folder)
    processor = BlipProcessor.from_pretrained(folder)
    sample = make_sample(0, 0)
    inputs = processor(images=sample.image, text=sample.scene.caption, return_tensors="pt")
    # training fed pixels through to_model_range; the processor must give the same tensor
    expected = tw.to_model_range(np.asarray(sample.image)[None])
    assert torch.allclose(inputs["pixel_values"], expected, atol=1e-5)
    assert inputs["input_ids"][0, 0] == model.config.text_config.bos_token_id
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    generated = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=4)
    assert isinstance(processor.decode(generated[0], skip_special_tokens=True), str)


def test_more_steps_continue_from_the_checkpoint(world, tmp_path):
    config, _ = world
    output = tmp_path / "shapes-world"
    shutil.copytree(config.work, tmp_path / "shapes-world-work")
    longer = dataclasses.replace(config, output_dir=str(output), unet_steps=4, eval_prompts_per_category=0)
    info = tw.train_world(longer)
    assert info["stages"]["vae"]["resumed_from"] == 2 and info["stages"]["vae"]["steps"] == 2
    assert info["stages"]["unet"]["resumed_from"] == 2 and info["stages"]["unet"]["steps"] == 4
    assert tw.load_checkpoint(tw.checkpoint_path(longer.work, "unet"))["step"] == 4
    StableDiffusionPipeline.from_pretrained(output)


def test_interrupted_stage_resumes_to_identical_weights(tmp_path, monkeypatch):
    images, captions = tw.render_dataset(0, 32, "train")
    latents = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tokenizer = tw.build_tokenizer(tmp_path / "tokenizer")
    settings = {**TINY, "unet_steps": 4, "checkpoint_every": 2}

    straight = tw.WorldConfig(output_dir=str(tmp_path / "straight"), **settings)
    unet_a, text_a, _ = tw.train_unet(straight, latents, captions, tokenizer)

    interrupted = tw.WorldConfig(output_dir=str(tmp_path / "interrupted"), **settings)
    real_save = tw.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after the first checkpoint reached the disk

    monkeypatch.setattr(tw, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tw.train_unet(interrupted, latents, captions, tokenizer)
    monkeypatch.undo()
    unet_b, text_b, info = tw.train_unet(interrupted, latents, captions, tokenizer)

    assert info["resumed_from"] == 2 and info["steps"] == 4
    for a, b in zip([*unet_a.parameters(), *text_a.parameters()], [*unet_b.parameters(), *text_b.parameters()]):
        assert torch.equal(a, b)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "stage.safetensors"
    tw.save_checkpoint(path, {"step": 1})

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(tw, "save_file", broken_save)
    with pytest.raises(OSError):
        tw.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert tw.load_checkpoint(path)["step"] == 1


def test_command_line_options_fill_the_config(tmp_path):
    (tmp_path / "world.yaml").write_text("seed: 3\nunet_steps: 7\nunet_lr: 2e-4\n")
    argv = ["--output", "somewhere", "--config", str(tmp_path / "world.yaml"), "--set", "unet_steps=5"]
    config = tw.parse_args(argv + ["--set", "unet_channels=[8, 16]", "--set", "unet_heads=[1, 2]"])
    assert config.output_dir == "somewhere" and config.seed == 3 and config.unet_steps == 5
    assert config.unet_lr == 2e-4  # YAML 1.1 reads 2e-4 as text; a float option takes it as the number
    assert config.unet_channels == (8, 16) and config.work == tw.Path("somewhere-work")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("unet_steps=-1", "--set: unet_steps must be an integer >= 0, got -1"),
        ("unet_lr=0", "--set: unet_lr must be a number > 0, got 0"),
        ("unet_channels=[8, 16]", "--set: unet_heads must have one entry per unet_channels entry (2), got [2, 4, 8]"),
        ("captioner_split=test", "--set: captioner_split must be one of 'train', 'all', 'held_out', got 'test'"),
        ("unet_step=3", "--set: unknown option 'unet_step' (did you mean 'unet_steps'?)"),
    ],
)
def test_bad_world_options_are_one_line_errors_before_any_work(setting, message, tmp_path, capsys):
    from realign_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["world", "train", "--output", str(tmp_path / "world"), "--set", setting])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"realign world train: error: {message}\n"
    assert not (tmp_path / "world").exists() and not (tmp_path / "world-work").exists()


def evaluation_set() -> set[str]:
    """Every prompt of ``realign eval``'s final tables (both evaluation splits, seed 0)."""
    return {
        prompt
        for category in EVAL_CATEGORIES
        for split in ("held_out", "seen")
        for prompt in evaluation_prompts(category, split, EVAL_PROMPTS_PER_CATEGORY, seed=0)
    }


def test_world_training_judges_development_prompts_never_evaluation_ones(world):
    config, info = world
    judged = [
        example["prompt"] for key, row in info["evaluation"].items() if "/" in key for example in row["examples"]
    ]
    # The fixture judges one prompt per row: the six rows' prompts are exactly the examples recorded.
    assert sorted(key for key in info["evaluation"] if "/" in key) == sorted(
        f"{split}/{category}" for split in ("development", "development_seen") for category in EVAL_CATEGORIES
    )
    assert len(judged) == 6 and not evaluation_set().intersection(judged)
    for seed in (0, 1, 7):
        sets = tw.judged_prompt_sets(dataclasses.replace(config, seed=seed, eval_prompts_per_category=100))
        assert [len(prompts) for prompts in sets.values()] == [16] * 6  # the whole development split
        assert not evaluation_set().intersection(p for prompts in sets.values() for p in prompts)


class Planted:
    """Unpickling this writes ``marker``: the code execution that loading a planted checkpoint would allow."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["unet.safetensors", "unet.ckpt"])
def test_a_planted_pickle_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "planted-code-ran"
    buffer = io.BytesIO()
    torch.save({"step": 3, "payload": Planted(marker)}, buffer)
    (tmp_path / name).write_bytes(buffer.getvalue())
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)["step"] == 3 and marker.exists()  # it works
    marker.unlink()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    expected = ValueError if name.endswith(".safetensors") else RuntimeError
    with pytest.raises(expected, match="unet"):
        tw.resume_stage(tw.checkpoint_path(tmp_path, "unet"), model, optimizer, torch.Generator())
    assert not marker.exists()


def test_checkpoint_round_trip_keeps_every_kind_of_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    ema = [p.detach().clone() + 1 for p in model.parameters()]
    path = tw.checkpoint_path(tmp_path, "vae")
    tw.save_stage(path, 7, model, optimizer, generator, ema)
    state = tw.load_checkpoint(path)
    assert state["step"] == 7 and state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1 and set(state["optimizer"]["state"]) == {0, 1}
    assert torch.equal(state["generator"], generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(state["ema"], ema))

    restored, restored_generator = torch.nn.Linear(3, 2), torch.Generator()
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    assert tw.resume_stage(path, restored, restored_optimizer, restored_generator) == 7
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    assert torch.equal(torch.rand(4, generator=restored_generator), torch.rand(4, generator=generator))
    for saved, loaded in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert restored_optimizer.param_groups[0]["lr"] == 0.1
