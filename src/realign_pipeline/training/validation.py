"""Validation: the validation prompts drawn with fixed seeds, scored by the run's reward, their grid saved as
``samples_<tag>.png`` and each score appended to ``validation.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .common import generate, image_grid, score_images
from .config import TrainConfig
from .data import read_prompts

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .lifecycle import Run

VALIDATION_LOG = "validation.jsonl"


def validation_prompts(config: TrainConfig, prompts: list[str]) -> list[str]:
    """The first ``num_validation_prompts`` of ``validation_prompts`` (a file), else of the training prompts."""
    if config.validation_prompts:
        return read_prompts(config.validation_prompts)[: config.num_validation_prompts]
    return prompts[: config.num_validation_prompts]


def validate(run: Run, tag: str, step: int | None = None) -> dict[str, float]:
    """Score the validation prompts (fixed seeds) on the main process; save their grid as
    ``samples_<tag>.png``; log and append to ``validation.jsonl``. Returns the mean scores
    (on every process: they are broadcast, as the reward-ranked trainer decides on them)."""
    from accelerate.utils import broadcast_object_list

    config, accelerator, unet = run.config, run.accelerator, run.sampling_unet
    results: list[Any] = [None]
    if accelerator.is_main_process:
        prompts = validation_prompts(config, read_prompts(config.prompts, config.prompt_split, config.prompt_column))
        seeds = [config.seed + index for index in range(len(prompts))]
        was_training = unet.training
        unet.eval()
        with accelerator.autocast():
            _, images = generate(
                run.components, unet, prompts, seeds, config, device=accelerator.device, dtype=run.weight_dtype
            )
        unet.train(was_training)
        scores = score_images(run.reward, images, prompts)
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
    """Every record ``validate`` appended to ``output_dir/validation.jsonl``, in order."""
    path = Path(output_dir) / VALIDATION_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
