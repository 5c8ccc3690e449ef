"""``train(config)``: the entry point the CLI, ``python -m realign_pipeline.training`` and
``accelerate launch`` all reach."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from ..rewards.base import Reward
from .config import TrainConfig, load_config
from .outputs import TrainResult


def train(config: TrainConfig, reward: Reward | None = None) -> TrainResult:
    """Train with ReFL or reward-ranked learning, as ``config.method`` says."""
    if config.method == "refl":
        from .refl import train_refl

        return train_refl(config, reward)
    from .reward_ranked import train_reward_ranked

    return train_reward_ranked(config, reward)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """``python -m realign_pipeline.training --config run.yaml [--set key=value ...]``; the same
    arguments work under ``accelerate launch -m realign_pipeline.training``."""
    parser = argparse.ArgumentParser(prog="python -m realign_pipeline.training", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML, JSON or TOML file of TrainConfig options.")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override one option."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(load_config(args.config, args.overrides))
