"""What both trainers do before their first step and after their last: ``start_run`` (accelerator, seed,
models, reward, prompts, optimizer and LR schedule), ``resume`` and ``finish_run`` (validate, export the UNet and
the LoRA adapter, write ``training_summary.json``). ``Run`` holds what the steps in between read."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ..hub import SUMMARY_FILE
from ..rewards.base import Reward, to_pil_images
from ..rewards.factory import build_rewards
from .checkpoint import load_checkpoint, register_lora_checkpoint_hooks, resolve_resume
from .common import (
    Components,
    generate,
    load_components,
    make_optimizer_and_scheduler,
    place_components,
    tracker_config,
    trainable_parameters,
    weight_dtype_for,
)
from .config import TrainConfig
from .data import CaptionedImages, load_captioned_images, read_prompts, write_captioned_images
from .export import export_unet, save_lora_adapter, weight_fingerprint
from .validation import read_validation_log, validate

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run leaves behind. ``finished`` is False when it stopped early (``stop_after_steps``)."""

    output_dir: Path
    global_step: int
    finished: bool
    validation: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A run's live objects, made by ``start_run``.

    ``unet`` is what ``accelerator.prepare`` returned (step it, accumulate on it, gather from it);
    ``sampling_unet`` the same model unwrapped (sample and validate with it). ``parameters`` are the
    trainable ones, in float32; ``ema`` their exponential moving average (``EMAModel``) when asked for.
    """

    config: TrainConfig
    accelerator: Accelerator
    components: Components
    unet: torch.nn.Module
    sampling_unet: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    reward: Reward
    prompts: list[str]
    weight_dtype: torch.dtype
    ema: Any = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


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


def start_run(
    config: TrainConfig,
    reward: Reward | None,
    total_steps: Callable[[list[str], int], int],
    check_reward: Callable[[Reward], Reward] = lambda reward: reward,
    use_ema: bool = False,
) -> Run:
    """Everything before the first step, in order: the accelerator and the seed (the same LoRA
    initialisation on every process); the models (frozen VAE and text encoder in the compute dtype,
    trainable weights in float32); the reward (``reward``, else built from ``config.rewards``, then
    ``check_reward``, which may refuse or wrap it); the prompts; the optimizer and the LR schedule over
    ``total_steps(prompts, num_processes)`` optimizer steps; an EMA of the weights (``use_ema``);
    ``accelerator.prepare``; the trackers. Then a trainer builds what only it needs and calls ``resume``.
    """
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    device = accelerator.device
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)

    components = load_components(config)
    place_components(components, device, weight_dtype, use_lora=config.use_lora)
    parameters = trainable_parameters(components.unet)

    reward = check_reward(reward if reward is not None else build_rewards(config.rewards, device=device))
    prompts = read_prompts(config.prompts, config.prompt_split, config.prompt_column)

    # Optimizer, LR schedule (accelerate steps a prepared scheduler once per process), EMA.
    optimizer, lr_scheduler = make_optimizer_and_scheduler(
        config, parameters, total_steps(prompts, accelerator.num_processes), accelerator.num_processes
    )
    ema = None
    if use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(parameters, decay=config.ema_decay)
    unet, optimizer, lr_scheduler = accelerator.prepare(components.unet, optimizer, lr_scheduler)
    if ema is not None:
        # Not accelerator.register_for_checkpointing(ema): accelerate would unpickle it on resume
        # (weights_only=False); save_checkpoint / load_checkpoint keep it as safetensors.
        ema.to(device)
    if config.use_lora:
        register_lora_checkpoint_hooks(accelerator)

    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config=tracker_config(config))
    return Run(
        config=config,
        accelerator=accelerator,
        components=components,
        unet=unet,
        sampling_unet=accelerator.unwrap_model(unet),
        parameters=parameters,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        reward=reward,
        prompts=prompts,
        weight_dtype=weight_dtype,
        ema=ema,
    )


def resume(run: Run) -> dict[str, Any] | None:
    """Load the checkpoint ``config.resume_from_checkpoint`` names (the newest, for ``latest``): weights,
    optimizer, LR scheduler, EMA and RNG states. Returns the trainer's state saved with it (``{"step": ...}``),
    ``None`` when there is none. Call it after every set-up step that draws random numbers, so a resumed run
    continues from the RNG states it saved."""
    checkpoint = resolve_resume(run.config.resume_from_checkpoint, run.config.output_dir)
    if checkpoint is None:
        return None
    state = load_checkpoint(run.accelerator, checkpoint, ema=run.ema)
    logger.info(f"Resumed from {checkpoint} at step {state['step']}.")
    return state


def prepare_regularizer(run: Run) -> CaptionedImages | None:
    """The (image, caption) pairs of the denoising regulariser, or None when it is off.

    ``pretrain_data: generate`` makes them once with the base model (before any update, LoRA's
    zero-initialised up-projection leaves it unchanged) for the training prompts, so the
    regulariser keeps the model near its own starting distribution when no captioned data is at hand.
    """
    config, accelerator, components, prompts = run.config, run.accelerator, run.components, run.prompts
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
                _, images = generate(
                    components,
                    components.unet,
                    chosen,
                    seeds,
                    config,
                    device=accelerator.device,
                    dtype=run.weight_dtype,
                )
            temporary = folder.with_name(".tmp-regularizer")
            shutil.rmtree(temporary, ignore_errors=True)
            write_captioned_images(temporary, to_pil_images(images), chosen)
            os.replace(temporary, folder)
        accelerator.wait_for_everyone()
        source = str(folder)
    return load_captioned_images(
        source, config.resolution, config.pretrain_image_column, config.pretrain_caption_column
    )


def finish_run(
    run: Run,
    global_step: int,
    finished: bool,
    history: dict[str, Any],
    extra_summary: dict[str, Any] | None = None,
) -> TrainResult:
    """After the last step: validate, save ``unet/`` (merged) and ``lora/``, write the summary.

    ``export_unet`` gathers sharded weights from the prepared ``run.unet``. The summary records every
    process's weight fingerprint: under data parallelism they must be identical, and a difference
    means the processes drifted apart. Credentials in the config are redacted in what is written.
    """
    config, accelerator, unet = run.config, run.accelerator, run.sampling_unet
    output_dir = run.output_dir
    fingerprints = accelerator.gather(weight_fingerprint(unet).to(accelerator.device)[None]).cpu().tolist()
    if finished:
        validate(run, "after", global_step)
        export_unet(config, accelerator, run.unet, unet, run.weight_dtype, output_dir / "unet")
        if accelerator.is_main_process:
            if config.use_lora and config.save_lora_adapter:
                save_lora_adapter(unet, output_dir / "lora")
            # A run restarted before its first checkpoint validates "before" again: keep the last of each.
            latest = {row["tag"]: row for row in read_validation_log(output_dir)}
            summary = {
                "method": config.method,
                "config": config.to_public_dict(),
                "num_prompts": len(run.prompts),
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
    # ``Accelerator.end_training`` without leaving the process group: ``run.train`` leaves it once this run's
    # DDP wrapper is freed (``run.leave_process_group`` says why).
    for tracker in accelerator.trackers:
        tracker.finish()
    return TrainResult(output_dir, global_step, finished, read_validation_log(output_dir), history)
