"""Run set-up and wrap-up shared by the trainers: accelerator, regulariser data, validation, saving."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ..hub import SUMMARY_FILE, save_lora_adapter, save_unet
from ..rewards.base import Reward, to_pil_images
from .common import Components, generate, image_grid, score_images
from .config import TrainConfig
from .data import CaptionedImages, load_captioned_images, read_prompts, write_captioned_images

logger = logging.getLogger(__name__)

VALIDATION_LOG = "validation.jsonl"


@dataclass
class TrainResult:
    """What a run leaves behind. ``finished`` is False when it stopped early (``stop_after_steps``)."""

    output_dir: Path
    global_step: int
    finished: bool
    validation: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's ``Accelerator``. ``accelerate launch --mixed_precision`` wins over a config left at ``no``."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_with: str | None = None if config.report_to == "none" else config.report_to
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=None if config.mixed_precision == "no" else config.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def validation_prompts(config: TrainConfig, prompts: list[str]) -> list[str]:
    if config.validation_prompts:
        return read_prompts(config.validation_prompts)[: config.num_validation_prompts]
    return prompts[: config.num_validation_prompts]


def validate(
    config: TrainConfig,
    components: Components,
    unet: torch.nn.Module,
    reward: Reward,
    accelerator: Accelerator,
    dtype: torch.dtype,
    tag: str,
    step: int | None = None,
) -> dict[str, float]:
    """Score the validation prompts (fixed seeds) on the main process; save their grid as
    ``samples_<tag>.png``; log and append to ``validation.jsonl``. Returns the mean scores
    (on every process: they are broadcast, as the reward-ranked trainer decides on them)."""
    from accelerate.utils import broadcast_object_list

    results: list[Any] = [None]
    if accelerator.is_main_process:
        prompts = validation_prompts(config, read_prompts(config.prompts, config.prompt_split, config.prompt_column))
        seeds = [config.seed + index for index in range(len(prompts))]
        was_training = unet.training
        unet.eval()
        with accelerator.autocast():
            _, images = generate(components, unet, prompts, seeds, config, accelerator.device, dtype)
        unet.train(was_training)
        scores = score_images(reward, images, prompts)
        means = {name: float(torch.nanmean(values.float())) for name, values in scores.items()}
        output_dir = Path(config.output_dir)
        grid = image_grid(images)
        grid.save(output_dir / f"samples_{tag}.png")
        record = {"tag": tag, "step": step, **means}
        with open(output_dir / VALIDATION_LOG, "a") as log:
            log.write(json.dumps(record) + "\n")
        accelerator.log({f"validation/{name}": value for name, value in means.items()}, step=step or 0)
        _log_grid(accelerator, grid, tag, step or 0)
        results = [means]
    accelerator.wait_for_everyone()
    broadcast_object_list(results, from_process=0)
    return results[0]


def _log_grid(accelerator: Accelerator, grid: Any, tag: str, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(f"samples/{tag}", np.asarray(grid), step, dataformats="HWC")


def read_validation_log(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / VALIDATION_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_regularizer(
    config: TrainConfig,
    components: Components,
    accelerator: Accelerator,
    prompts: list[str],
    dtype: torch.dtype,
) -> CaptionedImages | None:
    """The (image, caption) pairs of the denoising regulariser, or None when it is off.

    ``pretrain_data: generate`` makes them once with the base model (before any update, LoRA's
    zero-initialised up-projection leaves it unchanged) for the training prompts, so the
    regulariser keeps the model near its own starting distribution when no captioned data is at hand.
    """
    if config.pretrain_loss_weight <= 0:
        return None
    if config.pretrain_data is None:
        logger.warning("pretrain_loss_weight > 0 but no pretrain_data: training without the denoising regulariser.")
        return None
    source = config.pretrain_data
    if source == "generate":
        folder = Path(config.output_dir) / "regularizer"
        if accelerator.is_main_process and not (folder / "metadata.jsonl").is_file():
            count = config.pretrain_generate_count
            chosen = [prompts[index % len(prompts)] for index in range(count)]
            seeds = [10_000_000 + config.seed + index for index in range(count)]
            with accelerator.autocast():
                _, images = generate(components, components.unet, chosen, seeds, config, accelerator.device, dtype)
            temporary = folder.with_name(".tmp-regularizer")
            shutil.rmtree(temporary, ignore_errors=True)
            write_captioned_images(temporary, to_pil_images(images), chosen)
            os.replace(temporary, folder)
        accelerator.wait_for_everyone()
        source = str(folder)
    return load_captioned_images(
        source, config.resolution, config.pretrain_image_column, config.pretrain_caption_column
    )


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


def finish_run(
    config: TrainConfig,
    accelerator: Accelerator,
    components: Components,
    unet: torch.nn.Module,
    reward: Reward,
    dtype: torch.dtype,
    global_step: int,
    finished: bool,
    history: dict[str, Any],
    prompts: list[str],
    extra_summary: dict[str, Any] | None = None,
    prepared_unet: torch.nn.Module | None = None,
) -> TrainResult:
    """After the last step: validate, save ``unet/`` (merged) and ``lora/``, write the summary.

    ``unet`` is the unwrapped model, ``prepared_unet`` what ``accelerator.prepare`` returned (default:
    ``unet``), from which ``export_unet`` gathers sharded weights. The summary records every
    process's weight fingerprint: under data parallelism they must be identical, and a difference
    means the processes drifted apart. Credentials in the config are redacted in what is written.
    """
    output_dir = Path(config.output_dir)
    fingerprints = accelerator.gather(weight_fingerprint(unet).to(accelerator.device)[None]).cpu().tolist()
    if finished:
        validate(config, components, unet, reward, accelerator, dtype, "after", global_step)
        prepared = prepared_unet if prepared_unet is not None else unet
        export_unet(config, accelerator, prepared, unet, dtype, output_dir / "unet")
        if accelerator.is_main_process:
            if config.use_lora and config.save_lora_adapter:
                save_lora_adapter(unet, output_dir / "lora")
            # A run restarted before its first checkpoint validates "before" again: keep the last of each.
            latest = {row["tag"]: row for row in read_validation_log(output_dir)}
            summary = {
                "method": config.method,
                "config": config.to_public_dict(),
                "num_prompts": len(prompts),
                "global_step": global_step,
                "num_processes": accelerator.num_processes,
                "process_weight_fingerprints": fingerprints,
                "validation_table": [
                    {"when": tag, **{k: v for k, v in row.items() if k not in ("tag", "step")}}
                    for tag, row in latest.items()
                    if tag in ("before", "after") or tag.startswith("round")
                ],
                **(extra_summary or {}),
            }
            (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            config.save(output_dir / "config.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave the process group explicitly: left to interpreter shutdown, a gloo rank was seen to hang at exit.
        torch.distributed.destroy_process_group()
    return TrainResult(output_dir, global_step, finished, read_validation_log(output_dir), history)
