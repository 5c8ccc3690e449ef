"""Assemble reward-ranked learning (FineRewards, after RAFT): sample, rank, keep the best, learn it.

RAFT (Dong et al., arXiv 2304.06767), Algorithm 1, with FineRewards' assembled ranking: each
round, for every prompt ``y`` draw ``K`` samples from the current model, rank them under each
reward ``r_j`` (rank 0 = best), and keep the sample(s) with the smallest weighted rank sum

    R(x) = Σ_j w_j · rank_j(x)

(ranks, unlike raw scores, need no common scale across rewards). Fine-tune on the kept
(latent, prompt) pairs with the ordinary denoising loss. ImageReward saw RAFT degrade round by
round, so every round is evaluated on the validation prompts and the *best* round's weights are
kept (the base model, round 0, included), not the last.

Works with non-differentiable rewards (captions, tags). Checkpoints are written at the end of
each round; a killed run resumes at the start of the round it was in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..rewards.base import Reward
from ..rewards.combine import WeightedSum
from .checkpoint import save_checkpoint
from .common import (
    denoising_loss,
    encode_prompts,
    generate,
    noised_batch,
)
from .config import TrainConfig
from .data import step_generator
from .lifecycle import TrainResult, finish_run, resume, start_run
from .validation import validate

logger = logging.getLogger(__name__)

BEST_WEIGHTS = "best/trainable.safetensors"


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis, 0 for the highest score; ties share their average rank; NaN ranks last."""
    scores = torch.nan_to_num(scores.float(), nan=-math.inf)
    greater = (scores.unsqueeze(-2) > scores.unsqueeze(-1)).sum(-1)
    equal = (scores.unsqueeze(-2) == scores.unsqueeze(-1)).sum(-1) - 1
    return greater.float() + equal.float() / 2


def rank_sum(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """FineRewards' assembled rank ``R = Σ_j w_j rank_j`` for scores ``(..., K)`` per reward."""
    weights = weights or {}
    total = None
    for name, values in scores.items():
        term = float(weights.get(name, 1.0)) * average_ranks(values)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("rank_sum needs at least one reward's scores.")
    return total


def select_best(
    scores: Mapping[str, torch.Tensor], keep: int = 1, weights: Mapping[str, float] | None = None
) -> torch.Tensor:
    """Indices ``(..., keep)`` of the samples with the smallest rank sum (ties: the earlier sample)."""
    return torch.argsort(rank_sum(scores, weights), dim=-1, stable=True)[..., :keep]


def round_prompts(prompts: list[str], config: TrainConfig, round_index: int, num_processes: int) -> list[str]:
    """The prompts of one round (a seeded sample, or all), padded by wrapping to a multiple of the
    process count so every process trains the same number of steps (DDP needs it)."""
    chosen = list(prompts)
    if config.ranked_prompts_per_round is not None:
        rng = random.Random(config.seed * 7919 + round_index)
        count = config.ranked_prompts_per_round
        chosen = [chosen[i] for i in rng.sample(range(len(chosen)), count)] if count <= len(chosen) else chosen
    while len(chosen) % num_processes:
        chosen.append(chosen[len(chosen) % len(prompts)])
    return chosen


def _trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in unet.named_parameters() if p.requires_grad}


def _save_best(unet: torch.nn.Module, output_dir: Path) -> None:
    path = output_dir / BEST_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(_trainable_state(unet), temporary)
    os.replace(temporary, path)


def _load_best(unet: torch.nn.Module, output_dir: Path) -> None:
    state = load_file(output_dir / BEST_WEIGHTS)
    parameters = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name]))


def train_reward_ranked(config: TrainConfig, reward: Reward | None = None) -> TrainResult:
    """Run reward-ranked learning as ``config`` says (``ranked_*`` options); resumes per round.

    Under a multi-process launch, call it through ``run.train``, which leaves the process group afterwards
    (or call ``run.leave_process_group`` yourself once it returns)."""

    def micro_steps_per_round(prompts: list[str], num_processes: int) -> int:
        prompts_per_process = len(round_prompts(prompts, config, 1, num_processes)) // num_processes
        kept_per_process = prompts_per_process * config.ranked_keep_per_prompt
        micro_steps_per_epoch = math.ceil(kept_per_process / config.train_batch_size)
        # Whole accumulation cycles per round, so no half-accumulated gradient leaks into the next round.
        micro_steps = micro_steps_per_epoch * config.ranked_epochs_per_round
        return math.ceil(micro_steps / config.gradient_accumulation_steps) * config.gradient_accumulation_steps

    def total_steps(prompts: list[str], num_processes: int) -> int:
        return (
            micro_steps_per_round(prompts, num_processes)
            // config.gradient_accumulation_steps
            * (config.ranked_rounds)
        )

    run = start_run(config, reward, total_steps=total_steps, check_reward=as_weighted_sum)
    accelerator, components, unet, sampling_unet = run.accelerator, run.components, run.unet, run.sampling_unet
    parameters, optimizer, lr_scheduler = run.parameters, run.optimizer, run.lr_scheduler
    reward, device, weight_dtype, output_dir, prompts = (
        run.reward,
        run.device,
        run.weight_dtype,
        run.output_dir,
        run.prompts,
    )
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    micro_steps = micro_steps_per_round(prompts, num_processes)

    global_step, done_rounds, best_round, best_score = 0, 0, 0, -math.inf
    state = resume(run)
    if state is not None:
        global_step, done_rounds = state["step"], state["round"]
        best_round, best_score = state["best_round"], state["best_score"]
        logger.info(f"{done_rounds} rounds done, best so far round {best_round}.")

    if done_rounds == 0:
        # Round 0 is the base model: fine-tuning must beat it to be kept.
        best_score = validate(run, "before", 0)["total"]
        if accelerator.is_main_process:
            _save_best(sampling_unet, output_dir)
        accelerator.wait_for_everyone()

    progress = tqdm(
        total=total_steps(prompts, num_processes),
        initial=global_step,
        desc="reward-ranked steps",
        disable=not accelerator.is_local_main_process,
    )
    rounds: list[dict[str, Any]] = []
    for round_index in range(done_rounds + 1, config.ranked_rounds + 1):
        # 1. Sample K per prompt with the current model; keep the best by rank sum.
        chosen = round_prompts(prompts, config, round_index, num_processes)
        kept_latents, kept_prompts, kept_scores = [], [], []
        for global_index in range(process_index, len(chosen), num_processes):
            prompt = chosen[global_index]
            seeds = [
                int(step_generator(config.seed, round_index, global_index, k).initial_seed())
                for k in range(config.ranked_samples_per_prompt)
            ]
            batch_prompts = [prompt] * len(seeds)
            with accelerator.autocast():
                latents, images = generate(
                    components, sampling_unet, batch_prompts, seeds, config, device=device, dtype=weight_dtype
                )
                with torch.no_grad():
                    total, info = reward(images, batch_prompts)
            per_reward = {name: info[name].float() for name in reward.rewards}
            best = select_best(per_reward, config.ranked_keep_per_prompt, reward.weights)
            kept_latents.append(latents[best])
            kept_prompts += [prompt] * len(best)
            kept_scores.append(total.detach().float().cpu()[best])
        kept = torch.cat(kept_latents)
        kept_mean = accelerator.gather(torch.cat(kept_scores).to(device)).mean().item()

        # 2. Fine-tune on the kept samples with the denoising loss.
        round_losses = []
        for micro in range(micro_steps):
            epoch, position = divmod(micro * config.train_batch_size, len(kept))
            generator = step_generator(config.seed, round_index, micro, process_index)
            order = torch.randperm(len(kept), generator=step_generator(config.seed, round_index, epoch, 99))
            indices = [order[(position + i) % len(kept)].item() for i in range(config.train_batch_size)]
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    noisy, timesteps, target = noised_batch(components.noise_scheduler, kept[indices], generator)
                    cond = encode_prompts(components, [kept_prompts[i] for i in indices], device).to(weight_dtype)
                    prediction = unet(noisy, timesteps, encoder_hidden_states=cond).sample
                    loss = denoising_loss(prediction, target)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            round_losses.append(loss.item())
            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                accelerator.log({"loss": loss.item(), "round": round_index}, step=global_step)

        # 3. Evaluate; keep the best round's weights.
        means = validate(run, f"round-{round_index}", global_step)
        if means["total"] > best_score:
            best_round, best_score = round_index, means["total"]
            if accelerator.is_main_process:
                _save_best(sampling_unet, output_dir)
        row = {
            "round": round_index,
            "kept_reward": kept_mean,
            "validation_reward": means["total"],
            "loss": sum(round_losses) / len(round_losses),
        }
        rounds.append(row)
        if accelerator.is_main_process:
            with open(output_dir / "rounds.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
        accelerator.log({f"round/{k}": v for k, v in row.items()}, step=global_step)
        state = {"method": "reward_ranked", "round": round_index, "best_round": best_round, "best_score": best_score}
        save_checkpoint(accelerator, output_dir, global_step, state, config.checkpoints_total_limit)
        if config.stop_after_steps is not None and global_step >= config.stop_after_steps:
            break
    progress.close()

    finished = done_rounds >= config.ranked_rounds or (rounds and rounds[-1]["round"] == config.ranked_rounds)
    if finished:
        accelerator.wait_for_everyone()
        _load_best(sampling_unet, output_dir)
        logger.info(f"Keeping round {best_round} (validation reward {best_score:.4f}).")
    return finish_run(
        run,
        global_step,
        bool(finished),
        {"best_round": best_round, "best_score": best_score, "rounds": rounds},
        extra_summary={"best_round": best_round, "best_validation_reward": best_score},
    )


def as_weighted_sum(reward: Reward) -> WeightedSum:
    """Ranking reads each reward's scores by name: a single reward becomes a sum with one term."""
    return reward if isinstance(reward, WeightedSum) else WeightedSum({"reward": reward})
