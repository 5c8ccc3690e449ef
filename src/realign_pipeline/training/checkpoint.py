"""Checkpoints that are either whole or absent, and resuming from the newest one.

A checkpoint is ``accelerate``'s ``save_state`` folder (model or LoRA weights, optimizer, LR
scheduler, every process's RNG states) plus ``ema.safetensors`` when the run keeps an EMA and
``training_state.json`` with the step count. Nothing is registered with
``accelerator.register_for_checkpointing``: accelerate saves such objects as
``custom_checkpoint_<i>.pkl`` and loads them with ``weights_only=False``, so a planted file would
run code on resume; the EMA goes to safetensors instead (tensors plus a JSON header, no code).

A checkpoint is written under a temporary name and renamed into place with ``os.replace`` once
complete, so a run killed mid-write leaves the previous checkpoint as the newest; at most one
interval of work is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"


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
    ema: Any | None = None,
) -> Path:
    """Save the training state at ``step`` atomically; call on every process.

    ``ema`` (a diffusers ``EMAModel``, identical on every process) is written by the main process as
    ``ema.safetensors``. Keeps the newest ``total_limit`` checkpoints (all when ``None``).
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
        if ema is not None:
            save_ema(ema, temporary / EMA_FILE)
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


def load_checkpoint(accelerator: Accelerator, folder: str | Path, ema: Any | None = None) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` saved (the EMA into ``ema``, on its device); returns
    ``training_state.json`` (with ``step``)."""
    folder = Path(folder)
    pickled = sorted(path.name for path in folder.glob("custom_checkpoint_*.pkl"))
    if pickled:
        # Never ours (we register nothing with accelerate); unpickling them could run any code.
        raise ValueError(
            f"{folder} holds {pickled}, pickled objects this trainer never writes and will not load (unpickling "
            "can run code). Delete them if you trust nothing else in the folder changed, or start afresh."
        )
    if ema is not None and not (folder / EMA_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {EMA_FILE}: it was not saved by a run with use_ema (or by an older version, "
            "which pickled the EMA); resume it with use_ema: false or start afresh."
        )
    accelerator.load_state(str(folder))
    if ema is not None:
        load_ema(ema, folder / EMA_FILE)
    return json.loads((folder / STATE_FILE).read_text())


def save_ema(ema: Any, path: str | Path) -> None:
    """An ``EMAModel``'s state as safetensors: ``shadow_params.<i>`` tensors and its scalar settings
    (decay, optimization step, ...) as JSON in the file's metadata."""
    state = dict(ema.state_dict())
    shadow = state.pop("shadow_params")
    tensors = {f"shadow_params.{index}": value.detach().cpu().contiguous() for index, value in enumerate(shadow)}
    save_file(tensors, str(path), metadata={"ema_state": json.dumps(state), "num_shadow_params": str(len(shadow))})


def load_ema(ema: Any, path: str | Path) -> None:
    """Restore what ``save_ema`` wrote into ``ema``, keeping its shadow parameters' devices and dtypes."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        count = int(metadata.get("num_shadow_params", -1))
        if "ema_state" not in metadata or count != len(ema.shadow_params):
            raise ValueError(
                f"{path} holds {count} EMA tensors (or no EMA state) but the model has "
                f"{len(ema.shadow_params)} trainable parameters."
            )
        shadow = [file.get_tensor(f"shadow_params.{index}") for index in range(count)]
    state = json.loads(metadata["ema_state"])
    # EMAModel.load_state_dict checks that these are floats; JSON writes 1.0 as 1.0 but a user's 1 as 1.
    for key in ("decay", "min_decay"):
        state[key] = float(state[key])
    for index, (value, old) in enumerate(zip(shadow, ema.shadow_params)):
        if value.shape != old.shape:
            raise ValueError(
                f"{path}: EMA tensor {index} has shape {tuple(value.shape)}, the model's {tuple(old.shape)}."
            )
    state["shadow_params"] = [
        value.to(device=old.device, dtype=old.dtype) for value, old in zip(shadow, ema.shadow_params)
    ]
    ema.load_state_dict(state)


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
