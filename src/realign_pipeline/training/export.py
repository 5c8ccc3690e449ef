"""The trained weights on disk: a diffusers UNet folder (LoRA merged in), the LoRA adapter alone, and the
trainers' export of a UNet gathered from every process. Safetensors only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import TrainConfig

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict with every LoRA update folded into its base weight (the model is not
    changed): ``W = W_0 + ΔW`` per adapted layer, LoRA tensors dropped, peft's key renaming undone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            delta = None
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    update = module.get_delta_weight(adapter)
                    delta = update if delta is None else delta + update
            if delta is not None:
                deltas[f"{name}.weight"] = delta
    merged: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        value = value.detach()
        if clean in deltas:
            value = value + deltas[clean].to(value.dtype)
        merged[clean] = value.contiguous()
    return merged


def save_unet(
    unet: torch.nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``unet`` (LoRA merged in, if it has one) as a diffusers UNet folder with safetensors.

    ``state_dict`` replaces ``unet.state_dict()`` as the weights to write (``unet`` then gives only
    the config): a trainer passes ``accelerator.get_state_dict(model)``, the gathered weights, since
    under ZeRO-3 or FSDP the module itself holds only this process's shards. Not with a LoRA UNet,
    whose merge reads the adapter from the module.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if state_dict is not None and has_lora(unet):
        raise ValueError("save_unet: state_dict cannot be combined with a LoRA UNet (the merge reads the module).")
    if state_dict is not None:
        expected = set(unet.state_dict())
        if set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(
                f"save_unet: state_dict keys do not match the UNet's "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})."
            )
        state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    elif has_lora(unet):
        state = merged_state_dict(unet)
    else:
        state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    unet.save_config(folder)
    save_file({k: v.cpu() for k, v in state.items()}, folder / UNET_WEIGHTS, metadata={"format": "pt"})
    return folder


def save_lora_adapter(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Save the LoRA adapter alone (``pytorch_lora_weights.safetensors``), loadable with
    ``pipe.load_lora_weights(folder)``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("This UNet has no LoRA adapter to save.")
    folder = Path(folder)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def weight_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """``[Σ w, Σ w², Σ i·w]`` over the trainable weights in float64: equal weights give equal fingerprints."""
    total = torch.zeros(3, dtype=torch.float64)
    for parameter in module.parameters():
        if parameter.requires_grad:
            values = parameter.detach().double().flatten().cpu()
            positions = torch.arange(values.numel(), dtype=torch.float64)
            total += torch.stack([values.sum(), (values * values).sum(), (positions * values).sum()])
    return total


def full_precision_unet(config: TrainConfig, unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet to save. A LoRA run under mixed precision holds its frozen base weights in fp16/bf16;
    merging the adapter into those would round the whole UNet, so the adapter goes onto a fresh
    float32 copy of the base instead."""
    if not config.use_lora or dtype == torch.float32:
        return unet
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from .common import add_lora

    base = UNet2DConditionModel.from_pretrained(config.pretrained_model, subfolder="unet", revision=config.revision)
    add_lora(base, config)
    adapter = {key: value.float() for key, value in get_peft_model_state_dict(unet).items()}
    set_peft_model_state_dict(base, adapter)
    return base


def export_unet(
    config: TrainConfig,
    accelerator: Accelerator,
    prepared_unet: torch.nn.Module,
    unet: torch.nn.Module,
    dtype: torch.dtype,
    folder: str | Path,
) -> Path | None:
    """Save the trained UNet to ``folder`` (diffusers format); call on every process, the main one writes.

    A full fine-tune is exported from ``accelerator.get_state_dict(prepared_unet)``: under DeepSpeed
    ZeRO-3 or FSDP each process holds only a shard of every parameter, and only that call gathers
    the whole weights (a collective, hence on every process). A LoRA run merges its adapter from the
    unwrapped ``unet``, which is whole under DDP and ZeRO-1/2 (docs/training.md: not ZeRO-3/FSDP).
    Returns the folder on the main process, None elsewhere.
    """
    state_dict = None if config.use_lora else accelerator.get_state_dict(prepared_unet)
    if not accelerator.is_main_process:
        return None
    if state_dict is not None:
        return save_unet(unet, folder, state_dict=state_dict)
    return save_unet(full_precision_unet(config, unet, dtype), folder)
