"""Checkpoints that are either whole or absent, and resuming from the newest one.

A checkpoint is ``accelerate``'s ``save_state`` folder (model or LoRA weights, optimizer, LR
scheduler, every process's RNG states, registered objects such as the EMA) plus
``training_state.json`` with the step count. It is written under a temporary name and renamed
into place with ``os.replace`` once complete, so a run killed mid-write leaves the previous
checkpoint as the newest; at most one interval of work is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, folder)``, oldest first; temporary folders are ignored."""
    folder = checkpoints_folder(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    extra_state: dict[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Save the training state at ``step`` atomically; call on every process.

    Keeps the newest ``total_limit`` checkpoints (all when ``None``).
    """
    root = checkpoints_folder(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    temporary = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, **(extra_state or {})}
        state_file = temporary / STATE_FILE
        state_file.write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            # Only a checkpoint of the same step can be here (a rerun from an older one); replace it whole.
            stale = root / f".stale-{CHECKPOINT_PREFIX}{step}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(temporary, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: str | Path) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` saved; returns ``training_state.json`` (with ``step``)."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (None when there is none yet), a folder, or None."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    folder = Path(resume_from_checkpoint)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE_FILE}).")
    return folder


LORA_WEIGHTS_FILE = "unet_lora.safetensors"


def register_lora_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Checkpoint only the LoRA weights of a LoRA-trained UNet (megabytes, not the frozen gigabytes).

    Without these hooks ``save_state`` writes the whole UNet state dict, base weights included.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            if accelerator.is_main_process:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().contiguous() for k, v in state.items()}, Path(output_dir) / LORA_WEIGHTS_FILE)
            if weights:
                weights.pop()  # accelerate would otherwise save the full model as well

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(Path(input_dir) / LORA_WEIGHTS_FILE))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"LoRA checkpoint has keys the model lacks: {unexpected[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
