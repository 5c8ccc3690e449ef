"""``train(config)``: the entry point the CLI, ``python -m realign_pipeline.training`` and
``accelerate launch`` all reach."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..options import add_config_arguments
from .config import TrainConfig, check_run_inputs, load_config

if TYPE_CHECKING:
    from ..rewards.base import Reward
    from .lifecycle import TrainResult


def train(config: TrainConfig, reward: Reward | None = None) -> TrainResult:
    """Train with ReFL or reward-ranked learning, as ``config.method`` says; the files the run reads
    are checked first (``check_run_inputs``), before any model loads."""
    check_run_inputs(config)
    if config.method == "refl":
        from .refl import train_refl

        return train_refl(config, reward)
    from .reward_ranked import train_reward_ranked

    return train_reward_ranked(config, reward)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """``python -m realign_pipeline.training --config run.yaml [--set key=value ...]``; the same
    arguments work under ``accelerate launch -m realign_pipeline.training``."""
    parser = argparse.ArgumentParser(prog="python -m realign_pipeline.training", description=main.__doc__)
    add_config_arguments(parser, required=True, what="TrainConfig options")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_run_inputs(config)
    except UsageError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(config)
