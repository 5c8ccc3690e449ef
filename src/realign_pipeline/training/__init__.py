"""Caption-reward fine-tuning: ReFL and reward-ranked learning, on one device or many.

Names load on first use, so ``realign_pipeline.training.command`` (the CLI's ``train`` and
``push``) imports without the ``[train]`` extra (accelerate, peft) installed.
"""

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "PromptSampler": ".data",
    "TrainConfig": ".config",
    "TrainResult": ".lifecycle",
    "average_ranks": ".reward_ranked",
    "latest_checkpoint": ".checkpoint",
    "list_checkpoints": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "load_config": ".config",
    "rank_sum": ".reward_ranked",
    "read_prompts": ".data",
    "refl_loss": ".refl",
    "save_checkpoint": ".checkpoint",
    "select_best": ".reward_ranked",
    "step_generator": ".data",
    "train": ".run",
    "train_refl": ".refl",
    "train_reward_ranked": ".reward_ranked",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
