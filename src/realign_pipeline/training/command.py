"""``realign train`` and ``realign push``: argparse sub-commands the package's CLI registers.

Each ``add_*_parser(subparsers)`` adds its sub-command and sets ``run`` to the function that
executes it, so the CLI dispatches with ``args.run(args)`` as for ``generate`` and ``demo``.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..options import add_config_arguments

TRAIN_EPILOG = textwrap.dedent(
    """\
    examples:
      realign train --config refl.yaml          (docs/training.md has complete configs)
      realign train --config run.yaml --set max_train_steps=200 --set learning_rate=5e-6

      # several GPUs (or nodes): the same arguments under accelerate
      accelerate launch --multi_gpu --num_processes 4 -m realign_pipeline.training --config run.yaml

    A run writes checkpoints to OUTPUT_DIR/checkpoints every `checkpointing_steps` and, started
    again with the same command, resumes from the newest one. At the end OUTPUT_DIR holds
    unet/ (diffusers format, LoRA merged), lora/ (the adapter alone), sample grids before and
    after, and training_summary.json, which `realign push` turns into a model card.
    """
)

PUSH_EPILOG = textwrap.dedent(
    """\
    examples:
      realign push outputs/refl-sd15 --repo-id me/realign-sd15
      realign push outputs/refl-sd15 --repo-id me/realign-sd15-unet --unet-only --private
      realign push outputs/refl-sd15 --repo-id me/realign-sd15 --staging-dir /tmp/look --dry-run

    The full repository loads with plain diffusers (StableDiffusionPipeline.from_pretrained(repo))
    and with RealignDiff's fine stage (DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo,
    trust_remote_code=True)); an --unet-only one with
    RealignDiffPipeline.from_pretrained(base, realign_unet=repo). The token comes from --token,
    HF_TOKEN or `hf auth login`; HF_ENDPOINT points at another Hub.
    """
)


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train``: fine-tune a Stable Diffusion UNet with caption rewards (ReFL or reward-ranked)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune the UNet with caption rewards (ReFL or reward-ranked learning)",
        description=textwrap.fill(
            "Fine-tune a Stable Diffusion 1.x UNet for text-image alignment with caption rewards: "
            "ReFL on a differentiable reward (method: refl) or reward-ranked learning on any rewards "
            "(method: reward_ranked). Options are TrainConfig's fields, read from --config.",
            width=100,
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, required=True, what="TrainConfig options")
    parser.set_defaults(run=run_train, usage_prog=parser.prog)
    return parser


def run_train(args: argparse.Namespace) -> None:
    from .config import check_run_inputs, load_config

    config = load_config(args.config, args.overrides)  # a UsageError names the file and the option
    check_run_inputs(config)  # the prompt files and folders, before any model loads
    from .run import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(config)
    state = "finished" if result.finished else "stopped early (run the same command to resume)"
    print(f"{state} at step {result.global_step}; outputs in {result.output_dir}")


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``push``: upload a trained UNet (as a full pipeline, or alone) with a model card, in one commit."""
    parser = subparsers.add_parser(
        "push",
        help="upload the fine-tuned model with a model card to the Hugging Face Hub in one commit",
        description=textwrap.fill(
            "Upload a training output folder to a Hub model repository in one commit: the base pipeline "
            "with the fine-tuned UNet in place, model_index.json loadable as a plain StableDiffusionPipeline "
            "and pipeline.py for RealignDiff's fine stage (or, with --unet-only, just unet/), plus a model "
            "card written from training_summary.json.",
            width=100,
        ),
        epilog=PUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trained", type=Path, help="training output folder (holds unet/), or a UNet folder")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/realign-sd15")
    parser.add_argument(
        "--base-model", help="base pipeline (Hub id or folder); default: the one in training_summary.json"
    )
    parser.add_argument("--unet-only", action="store_true", help="upload unet/ and the card only (for realign_unet=)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    parser.add_argument("--revision", help="branch to commit to (created if missing); with --create-pr, the PR base")
    parser.add_argument(
        "--license", default="creativeml-openrail-m", help="license in the card (default: SD 1.x's, %(default)s)"
    )
    parser.add_argument(
        "--eval-table", type=Path, metavar="FILE", help="Markdown table to add as the card's evaluation"
    )
    parser.add_argument(
        "--staging-dir", type=Path, metavar="DIR", help="write the folder here (default: a temporary folder)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="build the folder (see --staging-dir) but upload nothing"
    )
    parser.set_defaults(run=run_push, usage_prog=parser.prog)
    return parser


def run_push(args: argparse.Namespace) -> None:
    # Local checks first: nothing is created on the Hub for a folder that cannot be built.
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..hub import HubError, build_upload_folder, check_push_inputs, push_pipeline

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise UsageError(f"--repo-id {args.repo_id}: not a Hub repo id ({error})") from None
    check_push_inputs(args.trained, args.base_model, args.staging_dir)
    if args.eval_table is not None and not args.eval_table.is_file():
        raise UsageError(f"--eval-table {args.eval_table}: no such file (a Markdown table)")
    if args.dry_run and args.staging_dir is None:
        raise UsageError("--dry-run needs --staging-dir DIR to leave the folder somewhere to look at")
    eval_table = args.eval_table.read_text(encoding="utf-8") if args.eval_table else None
    if args.dry_run:
        build_upload_folder(
            args.trained, args.staging_dir, args.repo_id, args.base_model, args.unet_only, args.license, eval_table
        )
        print(f"wrote {args.staging_dir}; nothing uploaded")
        return
    try:
        info = push_pipeline(
            args.trained,
            args.repo_id,
            base_model=args.base_model,
            unet_only=args.unet_only,
            token=args.token,
            private=args.private,
            create_pr=args.create_pr,
            revision=args.revision,
            license=args.license,
            eval_table=eval_table,
            staging_dir=args.staging_dir,
        )
    except HubError as error:
        raise UsageError(f"--repo-id {args.repo_id}: {error}") from None
    print(f"pushed: {info.pr_url or info.commit_url}")
