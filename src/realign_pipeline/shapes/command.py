"""``realign world train``, ``finetune``, ``ground`` and ``probe``: build the shapes world, fine-tune its UNet,
ground its words (issue [F]) and measure how far it stands in for Stable Diffusion.

    realign world train --output outputs/shapes-world --set unet_steps=4000
    realign world finetune --method refl --set max_train_steps=300
    realign world ground --output outputs/gw1 --set steps=1500 --set batch_size=24
    realign world probe --world outputs/gw1

Both read options through ``options.read_options`` (``--config FILE`` and ``--set KEY=VALUE``; typed,
range-checked, the file named in every error): ``WorldConfig``'s for ``train``, ``TrainConfig``'s for
``finetune`` on top of the world's defaults (``finetune.DEFAULTS``). Heavy modules load inside the run
functions, after every check that needs no model.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..options import add_config_arguments

if TYPE_CHECKING:
    from .finetune import FinetuneResult

# The built-in world, committed in the package.
WORLD = Path(__file__).resolve().with_name("world")
METHODS = ("refl", "reward_ranked")
# ReFL's regulariser: this many rendered training-split scenes (see finetune.REGULARIZER_SEED).
REGULARIZER_IMAGES = 2000


def quiet_openmp_threads() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set: libgomp reads it once, when torch is imported, and
    busy-waiting OpenMP threads run 5-10x slower on a shared CPU. Call it before torch is imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_world_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``world`` with its sub-commands ``train`` and ``finetune``."""
    parser = subparsers.add_parser(
        "world",
        help="train the built-in shapes world, or fine-tune its UNet with caption rewards",
        description="The shapes world: a small Stable Diffusion trained from scratch on coloured shapes "
        "(realign_pipeline.shapes), and its caption-reward fine-tuned UNets.",
    )
    commands = parser.add_subparsers(dest="world_command", required=True, metavar="{train,finetune,ground,probe}")
    train = commands.add_parser(
        "train",
        help="train the world from scratch (VAE, text encoder + UNet, BLIP captioner); resumable",
        description="Train the shapes world: every stage resumes from its last checkpoint in <output>-work/.",
    )
    add_world_train_arguments(train)
    train.set_defaults(run=run_world_train, usage_prog=train.prog)
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune the world's UNet with ReFL or reward-ranked learning (the ablation's rows)",
        description="Fine-tune the world's UNet with a caption-reward trainer and export it as "
        "<world>/unet-refl or <world>/unet-ranked; resumable.",
        epilog=textwrap.dedent(
            """\
            examples:
              realign world finetune --method refl --num-threads 1
              realign world finetune --method reward_ranked --set ranked_rounds=2
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_world_finetune_arguments(finetune)
    finetune.set_defaults(run=run_world_finetune, usage_prog=finetune.prog)
    ground = commands.add_parser(
        "ground",
        help="fine-tune the world so its object words carry the objects (TokenCompose losses); resumable",
        description="Fine-tune a world's UNet and text encoder with blanked padding and TokenCompose's token and "
        "pixel losses on the renderer's masks (realign_pipeline.shapes.ground_world), or train them so from a "
        "fresh initialisation (--set from_scratch=true); resumes from <output>-work/.",
    )
    ground.add_argument("--output", default=None, help="the grounded world's folder (default: GroundingConfig's)")
    add_config_arguments(ground, required=False, what="GroundingConfig options (realign_pipeline.shapes.ground_world)")
    ground.set_defaults(run=run_world_ground, usage_prog=ground.prog)
    probe = commands.add_parser(
        "probe",
        help="how far a world stands in for Stable Diffusion: word attention, attention masks, blanked words",
        description="Generate binding and relation prompts with a world and measure the share of each object "
        "word's attention inside its object, the IoU of the pipeline's attention masks with the judge's, and the "
        "blank-the-words test (realign_pipeline.shapes.stand_in); prints JSON.",
    )
    probe.add_argument("--world", default=str(WORLD), help="the world's folder (default: the built-in one)")
    probe.add_argument(
        "--split",
        choices=("development", "held_out", "seen"),
        default="development",
        help="development (the default): both development splits, held-out and seen pairings, each giving "
        "--prompts-per-category prompts per category; held_out and seen only for a final table",
    )
    probe.add_argument("--prompts-per-category", type=_positive_int, default=16, help="(default 16)")
    probe.add_argument("--seeds", type=_positive_int, default=2, help="(default 2)")
    probe.add_argument("--threads", type=_positive_int, default=1, help="(default 1)")
    probe.set_defaults(run=run_world_probe, usage_prog=probe.prog)
    return parser


def add_world_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="the world's folder (default: WorldConfig.output_dir)")
    add_config_arguments(parser, required=False, what="WorldConfig options (realign_pipeline.shapes.train_world)")


def add_world_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHODS, help="the trainer: ReFL or reward-ranked")
    parser.add_argument("--world", default=str(WORLD), help="the shapes-world folder (default: the built-in one)")
    parser.add_argument(
        "--work-dir", default=None, help="data, checkpoints (default outputs/shapes-finetune/<method>)"
    )
    parser.add_argument(
        "--export-to", default=None, help="folder that receives unet-refl/ or unet-ranked/ (default: --world)"
    )
    parser.add_argument("--num-threads", type=_positive_int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--regularizer-images", type=_positive_int, default=REGULARIZER_IMAGES, help="ReFL's regulariser scenes"
    )
    add_config_arguments(parser, required=False, what="TrainConfig options, on top of the world's defaults")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _check_folder_target(flag: str, value: str | Path | None) -> None:
    if value is not None and Path(value).exists() and not Path(value).is_dir():
        raise UsageError(f"{flag} {value}: a file is in the way; name a folder")


def _config_with_output(config_class: type, args: argparse.Namespace) -> Any:
    """``config_class`` read from ``--config`` and ``--set`` (``options.read_options``), its ``output_dir`` replaced
    by ``--output`` when given and checked to be a folder (or not there yet)."""
    import dataclasses

    from ..options import read_options

    config = read_options(config_class, args.config, args.overrides)
    if args.output is not None:
        config = dataclasses.replace(config, output_dir=args.output)
    _check_folder_target("output_dir", config.output_dir)
    return config


def run_world_train(args: argparse.Namespace) -> dict:
    """Read the ``WorldConfig`` (file, ``--set``, ``--output``), check it, then train (or resume)."""
    _check_folder_target("--output", args.output)
    quiet_openmp_threads()
    from .train_world import WorldConfig, train_world

    return train_world(_config_with_output(WorldConfig, args))


def run_world_finetune(args: argparse.Namespace, command: str | None = None) -> FinetuneResult:
    """Check the world folder and the ``TrainConfig``, then fine-tune and export the UNet."""
    if not (Path(args.world) / "model_index.json").is_file():
        raise UsageError(f"--world {args.world}: not a diffusers pipeline folder (no model_index.json)")
    _check_folder_target("--work-dir", args.work_dir)
    _check_folder_target("--export-to", args.export_to)
    quiet_openmp_threads()
    import torch

    from .finetune import build_config, finetune

    # TrainConfig's own checks, before any work: the paths it names are written by finetune itself.
    build_config(args.method, args.world, args.work_dir or ".", args.overrides, config_file=args.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    try:
        return finetune(
            args.method,
            args.world,
            args.work_dir,
            args.overrides,
            args.export_to,
            args.regularizer_images,
            command or finetune_command(args),
            config_file=args.config,
        )
    finally:
        torch.set_num_threads(threads)  # a caller's setting survives (tests run this in-process)


def finetune_command(args: argparse.Namespace) -> str:
    """The ``realign world finetune`` command line that repeats this run (for the export's README)."""
    parts = ["realign", "world", "finetune", "--method", args.method]
    for flag, value, default in (
        ("--world", args.world, str(WORLD)),
        ("--work-dir", args.work_dir, None),
        ("--export-to", args.export_to, None),
        ("--num-threads", args.num_threads, 2),
        ("--regularizer-images", args.regularizer_images, REGULARIZER_IMAGES),
        ("--config", args.config, None),
    ):
        if value is not None and value != default:
            parts += [flag, str(value)]
    for override in args.overrides:
        parts += ["--set", override]
    return shlex.join(parts)


def run_world_ground(args: argparse.Namespace) -> dict:
    """Read the ``GroundingConfig`` (file, ``--set``, ``--output``), check it, then ground (or resume)."""
    _check_folder_target("--output", args.output)
    quiet_openmp_threads()
    from .ground_world import GroundingConfig, ground_world

    config = _config_with_output(GroundingConfig, args)
    info = ground_world(config)
    print(f"wrote {config.output_dir} ({info['steps']} steps)")
    return info


def run_world_probe(args: argparse.Namespace) -> dict:
    """Measure a world's stand-in properties (``stand_in.probe_world``) and print them as JSON."""
    if not (Path(args.world) / "model_index.json").is_file():
        raise UsageError(f"--world {args.world}: not a diffusers pipeline folder (no model_index.json)")
    quiet_openmp_threads()
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    from .data import DEVELOPMENT_SPLITS, evaluation_prompts
    from .stand_in import probe_world

    torch.set_num_threads(args.threads)
    splits = DEVELOPMENT_SPLITS if args.split == "development" else (args.split,)
    prompts = [
        prompt
        for split in splits
        for category in ("binding", "relation")
        for prompt in evaluation_prompts(category, split, args.prompts_per_category)
    ]
    pipe = StableDiffusionPipeline.from_pretrained(args.world, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = probe_world(pipe, prompts, seeds=list(range(args.seeds)))
    report = {"world": str(args.world), "split": args.split, "prompts": len(prompts), **result.summary()}
    print(json.dumps(report, indent=2))
    return report
