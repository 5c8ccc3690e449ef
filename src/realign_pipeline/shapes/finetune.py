"""Fine-tune the shapes world's UNet with the package's caption-reward trainers (the ablation's
``refl`` and ``ranked`` rows).

    realign world finetune --method refl
    realign world finetune --method reward_ranked

(``python -m realign_pipeline.shapes.finetune`` takes the same arguments.)

One command per row, resumable: run it again after a kill and it continues from the newest
checkpoint in the work folder. It reads top to bottom:

1. the prompt files: ``data.finetune_prompts()`` to train on and ``data.development_prompts()`` to
   validate on (disjoint; neither holds a prompt of ``realign eval``'s evaluation sets);
2. for ReFL, the denoising regulariser's (image, caption) pairs: rendered training-split scenes
   (no held-out pairing drawn), as ReFL regularises with LAION pairs;
3. a ``TrainConfig`` for the world (``DEFAULTS``, the one place the per-method settings live,
   then ``--config FILE`` and ``--set key=value``, read by ``options.read_options``);
4. ``train(config)``, the same code path as ``realign train``;
5. the trained UNet exported in float16 safetensors as ``<world>/unet-refl/`` or
   ``<world>/unet-ranked/`` with a ``README.md`` saying how it was made, loadable with
   ``RealignDiffPipeline.from_pretrained(world, realign_unet=world, realign_unet_subfolder="unet-refl")``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..errors import UsageError
from ..options import read_options
from ..training.checkpoint import latest_checkpoint
from ..training.config import TrainConfig
from ..training.data import write_captioned_images
from ..training.export import save_unet
from ..training.lifecycle import TrainResult
from ..training.run import train
from .command import METHODS, REGULARIZER_IMAGES, WORLD, add_world_finetune_arguments, run_world_finetune
from .data import CATEGORIES, development_prompts, finetune_prompts, make_sample

EXPORT_SUBFOLDERS = {"refl": "unet-refl", "reward_ranked": "unet-ranked"}

# Regulariser scenes: training split only (the UNet never sees a held-out pairing drawn), from a
# stream other than the world's own training data (seed 0), captioner data (seed 1) and the
# VAE check (seed 2).
REGULARIZER_SEED = 100
# Validation prompts: this many per category of the development split (``data.development_prompts``), which
# the training prompts exclude, so the before/after reward is measured on prompts the run did not train on and
# no evaluation prompt steers a choice (reward-ranked learning picks its round on it); each listed
# VALIDATION_SEEDS times (the trainer draws one seed per line). The reward of one image varies a lot
# (its standard deviation is about 1 in log-probability), and reward-ranked learning picks its round
# on this mean, so it is taken over 96 images rather than 4.
VALIDATION_PER_CATEGORY = 12
VALIDATION_SEEDS = 2

# ---------------------------------------------------------------------------------------------
# The one place the run's settings live: TrainConfig overrides shared by both methods, then per
# method. TrainConfig's own defaults are ReFL's SD-1.5 settings; each line says why the world
# differs. Paths (pretrained_model, prompts, output_dir, the reward model, pretrain_data,
# validation_prompts) are filled in by ``build_config`` from --world and --work-dir.
#
# Timing on the project's 2-core CPU (shared with other jobs throughout, so upper bounds): a ReFL
# step of batch 4 took 1.5-1.75 s at 2 threads both while a world-training job held both cores and
# afterwards beside one other job; 2 threads barely help a model this small. Sampling for
# reward-ranked learning took 0.26-0.33 s per image (25 DDIM steps with guidance, batches of 8).
# The per-method comments give the runs' measured wall times.
DEFAULTS: dict[str, dict[str, Any]] = {
    "shared": {
        "resolution": 64,  # the world's images are 64 px (16x16x4 latents)
        "use_lora": False,  # 3.2 M parameters: full fine-tuning is cheap, checkpoints are ~40 MB
        "sampler": "ddim",  # the world ships a DDIMScheduler and is evaluated with DDIM ...
        "num_inference_steps": 25,  # ... at 25 steps ...
        "guidance_scale": 4.0,  # ... and guidance 4 (SD's 7.5 oversaturates this small model)
        "num_validation_prompts": VALIDATION_PER_CATEGORY * len(CATEGORIES) * VALIDATION_SEEDS,  # 96, not 4
        "report_to": "none",  # no TensorBoard dependency; validation.jsonl and the grids are written anyway
        "mixed_precision": "no",  # CPU
        "checkpoints_total_limit": 2,
    },
    "refl": {
        # Short runs on the first world model (100-200 steps, binding judged on 112 images): reward weight 0
        # (the regulariser alone) 13.4% binding, λ=1 15.2%, λ=3 at lr 1e-5 17.9%; lr 1e-4 degraded images.
        "learning_rate": 1.0e-5,
        "train_batch_size": 4,
        "max_train_steps": 300,  # 1.2 s/step at 1 thread beside other jobs: about 7 min
        "refl_step_range": [15, 25],  # ReFL's last quarter of 40 is [30, 40); the last 40% of 25 here
        # At λ=1 the reward term's gradient norm is ~26x the regulariser's (19 vs 0.73 at the start, 35 with
        # refl_step_range [10, 25]); AdamW's step does not scale with λ, which only sets how weakly the
        # regulariser anchors the weights.
        "reward_loss_weight": 3.0,  # λ: concept matching is a mean log-probability (about -1), not ImageReward's scale
        "pretrain_loss_weight": 1.0,
        "pretrain_batch_size": 4,
        "checkpointing_steps": 50,
        "validation_steps": 0,
    },
    "reward_ranked": {
        "learning_rate": 1.0e-5,  # as ReFL's: 1e-4 drifted the first world model's images
        "train_batch_size": 8,
        "ranked_samples_per_prompt": 8,
        "ranked_keep_per_prompt": 1,
        "ranked_rounds": 3,  # 3 rounds of 128 prompts x 8 samples: about 18 min at 1 thread beside other jobs
        "ranked_prompts_per_round": 128,
        "ranked_epochs_per_round": 2,
    },
}


def concept_matching_reward(world: str | Path) -> list[dict[str, Any]]:
    """The reward spec: concept matching with the world's captioner.

    ``prompt_prefix`` is empty because the world's captioner was trained on bare captions; BLIP's
    "a picture of " is out of its vocabulary (``picture`` is ``[UNK]``) and made the reward worse at
    telling right captions from wrong ones.
    """
    return [{"name": "concept_matching", "model": str(Path(world) / "captioner"), "prompt_prefix": "", "weight": 1.0}]


def build_config(
    method: str,
    world: str | Path,
    work_dir: str | Path,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
) -> TrainConfig:
    """The ``TrainConfig`` of one row: ``DEFAULTS`` for ``method`` and the world's paths, then the options of
    ``config_file``, then ``overrides`` (``["key=value", ...]`` or a mapping); ``UsageError`` names the source."""
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, not {method!r}.")
    work_dir = Path(work_dir)
    options: dict[str, Any] = {
        **DEFAULTS["shared"],
        **DEFAULTS[method],
        "method": method,
        "pretrained_model": str(world),
        "prompts": str(work_dir / "prompts.txt"),
        "validation_prompts": str(work_dir / "validation_prompts.txt"),
        "output_dir": str(work_dir / "run"),
        "rewards": concept_matching_reward(world),
    }
    if method == "refl":
        options["pretrain_data"] = str(work_dir / "regularizer")
    return read_options(TrainConfig, config_file, overrides, base=options)


def write_prompt_files(work_dir: str | Path) -> tuple[Path, Path]:
    """``prompts.txt`` (``finetune_prompts()``) and ``validation_prompts.txt`` (``development_prompts``, each
    ``VALIDATION_SEEDS`` times in a row) in ``work_dir``, one prompt per line.

    The two sets are disjoint, and neither holds a prompt of ``realign eval``'s evaluation sets.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    training = finetune_prompts()
    validation = [prompt for prompt in development_prompts(VALIDATION_PER_CATEGORY) for _ in range(VALIDATION_SEEDS)]
    paths = work_dir / "prompts.txt", work_dir / "validation_prompts.txt"
    for path, prompts in zip(paths, (training, validation)):
        path.write_text("\n".join(prompts) + "\n")
    return paths


def write_regularizer(folder: str | Path, count: int = REGULARIZER_IMAGES, seed: int = REGULARIZER_SEED) -> Path:
    """``count`` rendered training-split scenes as a captioned image folder (kept if already complete)."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.is_file() and len(metadata.read_text().splitlines()) == count:
        return folder
    samples = [make_sample(seed, index, "train") for index in range(count)]
    temporary = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    write_captioned_images(temporary, [s.image for s in samples], [s.scene.caption for s in samples])
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)
    return folder


def export_unet(trained: str | Path, target: str | Path) -> Path:
    """Write the trained ``unet/`` folder as float16 safetensors into ``target`` (replaced whole)."""
    target = Path(target)
    unet = UNet2DConditionModel.from_pretrained(trained, use_safetensors=True)
    temporary = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    save_unet(unet, temporary, dtype=torch.float16)
    for path in temporary.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the export is meant to be shared and committed
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
    return target


@dataclass
class FinetuneResult:
    """What a run left: the export folder (None if the run stopped early), the trainer's result."""

    export: Path | None
    train_result: TrainResult
    seconds: float


def finetune(
    method: str,
    world: str | Path = WORLD,
    work_dir: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    export_to: str | Path | None = None,
    regularizer_images: int = REGULARIZER_IMAGES,
    command: str | None = None,
    config_file: str | Path | None = None,
) -> FinetuneResult:
    """Write the data, train (or resume), export ``<export_to>/unet-<method>/`` with its README."""
    start = time.time()
    world = Path(world)
    work_dir = Path(work_dir) if work_dir is not None else Path("outputs") / "shapes-finetune" / method
    config = build_config(method, world, work_dir, overrides, config_file)  # a bad option fails here, before any work
    write_prompt_files(work_dir)
    if method == "refl" and config.pretrain_loss_weight > 0 and config.pretrain_data == str(work_dir / "regularizer"):
        write_regularizer(config.pretrain_data, regularizer_images)

    checkpoint = latest_checkpoint(config.output_dir)
    result = train(config)
    if not result.finished:
        print(f"Stopped at step {result.global_step}; run the same command without stop_after_steps to resume.")
        return FinetuneResult(None, result, time.time() - start)

    target = Path(export_to if export_to is not None else world) / EXPORT_SUBFOLDERS[method]
    export_unet(Path(config.output_dir) / "unet", target)
    seconds = time.time() - start
    write_readme(target, config, result, seconds, checkpoint, command)
    print(f"Exported the fine-tuned UNet to {target}.")
    return FinetuneResult(target, result, seconds)


# The export's model card (huggingface_hub's ``ModelCard.from_template``, Jinja2).
README_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: the shapes world's UNet fine-tuned with `{{ method }}`

A `UNet2DConditionModel` in float16 safetensors, fine-tuned from `unet/` of this world by
`realign_pipeline.shapes.finetune` with the concept-matching reward of `captioner/`.

```python
from realign_pipeline import RealignDiffPipeline
world = "src/realign_pipeline/shapes/world"  # the folder holding this one
pipe = RealignDiffPipeline.from_pretrained(world, realign_unet=world, realign_unet_subfolder="{{ name }}")
```

## How it was made

```
{{ command }}
```

Optimizer steps: {{ global_step }}. Wall time: {{ minutes }} min{{ resumed }}, {{ threads }} threads.

Validation reward (concept matching: the captioner's mean log-probability per prompt token;
{{ images }} validation images: the first of `validation_prompts.txt`, development-split prompts kept out of training,
each listed {{ seeds }} times with its own fixed seed; as the trainer logs them):

| when | step | reward |
|---|---|---|
{%- for tag, step, reward in rows %}
| {{ tag }} | {{ step }} | {{ reward }} |
{%- endfor %}
{%- if best_round is not none %}

Kept round {{ best_round }} (round 0 is the base model): reward-ranked learning keeps the round with the best
validation reward.
{%- endif %}

## Config

```json
{{ config_json }}
```
"""


def write_readme(
    folder: Path,
    config: TrainConfig,
    result: TrainResult,
    seconds: float,
    resumed_from: Path | None,
    command: str | None,
) -> Path:
    """``README.md`` in the export folder (``README_TEMPLATE``): command, config, steps, wall time, reward
    before/after."""
    from huggingface_hub import ModelCard, ModelCardData

    latest = {row["tag"]: row for row in result.validation}
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", tags=["realign-pipeline", "shapes-world", config.method]),
        template_str=README_TEMPLATE,
        name=folder.name,
        method=config.method,
        command=command or "realign world finetune --method " + config.method,
        global_step=result.global_step,
        minutes=f"{seconds / 60:.1f}",
        resumed=f" (this invocation resumed from `{resumed_from.name}`)" if resumed_from is not None else "",
        threads=torch.get_num_threads(),
        images=config.num_validation_prompts,
        seeds=VALIDATION_SEEDS,
        rows=[
            (tag, row.get("step"), f"{row.get('concept_matching', row.get('total')):.4f}")
            for tag, row in latest.items()
        ],
        best_round=result.extra.get("best_round") if config.method == "reward_ranked" else None,
        config_json=json.dumps(config.to_dict(), indent=2),
    )
    path = folder / "README.md"
    card.save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    """``python -m realign_pipeline.shapes.finetune``: the arguments of ``realign world finetune``."""
    parser = argparse.ArgumentParser(
        prog="python -m realign_pipeline.shapes.finetune", description=__doc__.split("\n\n")[0]
    )
    add_world_finetune_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> FinetuneResult:
    """The command line (``realign world finetune`` runs the same); every argument is checked before a model loads."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run_world_finetune(args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    # As train_world: libgomp reads OMP_WAIT_POLICY when torch is imported (this module imports it), so restart
    # with it set; spinning OpenMP threads on a shared CPU run several times slower. `realign world finetune`
    # sets it before torch loads.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "realign_pipeline.shapes.finetune", *sys.argv[1:]])
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
