"""``train(config)``: the entry point the CLI, ``python -m realign_pipeline.training`` and
``accelerate launch`` all reach."""

from __future__ import annotations

import argparse
import gc
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
    are checked first (``check_run_inputs``), before any model loads. Under ``accelerate launch`` with
    several processes, each leaves the process group at the end (``leave_process_group``)."""
    check_run_inputs(config)
    if config.method == "refl":
        from .refl import train_refl

        result = train_refl(config, reward)
    else:
        from .reward_ranked import train_reward_ranked

        result = train_reward_ranked(config, reward)
    # Here the trainer's frame, and with it the run's DDP wrapper, is gone.
    leave_process_group()
    return result


def leave_process_group() -> None:
    """Free what is left of the run's models, then leave the default process group (if one is up).

    The order matters with gloo. Whoever drops the last reference to ``ProcessGroupGloo`` joins its worker
    threads. DDP's reducer holds one, and its destructor runs with the GIL held; a worker that is just
    freeing a finished work, whose tensors are Python objects, waits for the GIL: a deadlock at exit
    (pytorch/pytorch#56297), seen here in 2 of 14 two-process CPU test runs under load, when the group was
    left (``Accelerator.end_training``) while the trainer still held its DDP wrapper. So ``finish_run``
    does not leave the group; here the reducer is freed first (``gc.collect`` breaks the wrapper's reference
    cycles) while the group is still registered, and leaving it then drops the last reference through the
    group's Python binding, which releases the GIL before destructing it.
    """
    from accelerate import PartialState  # here, not at the top: ``main`` answers bad arguments before torch loads

    gc.collect()
    PartialState().destroy_process_group()


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
