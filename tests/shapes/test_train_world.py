"""A smoke run of the world's training script at toy size: it writes a loadable pipeline and resumes."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from transformers import BlipForConditionalGeneration, BlipProcessor

from realign_pipeline.shapes import train_world as tw
from realign_pipeline.shapes.data import make_sample

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
    output = tmp_path_factory.mktemp("world") / "shapes-world"
    config = tw.WorldConfig(output_dir=str(output), **TINY)
    return config, tw.train_world(config)


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
    assert "Held out" in card and "StableDiffusionPipeline" in card and "| held_out/binding |" in card
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
    assert torch.load(longer.work / "unet.ckpt", weights_only=False)["step"] == 4
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
    path = tmp_path / "stage.ckpt"
    tw.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        tw.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert tw.load_checkpoint(path)["step"] == 1


def test_command_line_flags_fill_the_config():
    config = tw.parse_args(["--output", "somewhere", "--seed", "3", "--unet-steps", "5", "--unet-channels", "8", "16"])
    assert config.output_dir == "somewhere" and config.seed == 3 and config.unet_steps == 5
    assert config.unet_channels == (8, 16) and config.work == tw.Path("somewhere-work")
