"""Exporting the UNet goes through ``accelerator.get_state_dict``: under ZeRO-3 or FSDP the module on
each process holds only shards, and only that call returns the whole weights."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from realign_pipeline.training import TrainConfig
from realign_pipeline.training.export import export_unet, save_unet


def test_a_full_fine_tune_is_exported_from_the_gathered_state_dict(toy_model, tmp_path, monkeypatch):
    unet = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(unet)
    full = {key: value.clone() for key, value in accelerator.get_state_dict(prepared).items()}
    # What ZeRO-3 leaves in the module on each process: empty placeholders, the weights elsewhere.
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.data = torch.empty(0)
    calls = []

    def gathered_state_dict(model, unwrap=True):
        calls.append(model)
        return full

    monkeypatch.setattr(accelerator, "get_state_dict", gathered_state_dict)
    config = TrainConfig(use_lora=False)
    folder = export_unet(config, accelerator, prepared, unet, torch.float32, tmp_path / "unet")
    assert calls == [prepared]
    saved = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == full.keys()
    assert all(torch.equal(saved[key], full[key]) for key in full)
    reloaded = UNet2DConditionModel.from_pretrained(folder)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(v.numel() for v in full.values())


def test_save_unet_checks_a_given_state_dict(toy_model, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    state = dict(unet.state_dict())
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        save_unet(unet, tmp_path / "unet", state_dict=state)
