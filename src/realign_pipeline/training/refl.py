"""Reward feedback learning (ReFL) on a differentiable caption reward, with a denoising regulariser.

ImageReward (Xu et al., arXiv 2304.05977), Algorithm 1 / Eq. (4), as RealignDiff's coarse stage
uses it: for each prompt ``y``, sample ``x_T ~ N(0, I)`` and run the reverse process *without*
gradient down to a step ``t`` drawn from the last window ``[t1, t2)``; take that one step *with*
gradient, predict ``x̂0``, decode and score it, and minimise

    L = λ · mean(relu(α − r(y, D(x̂0))))  +  w_pre · E‖ε − ε_θ(√ᾱ_s z + √(1−ᾱ_s) ε, s, c)‖²

where the second term is the ordinary denoising loss on (image ``z``, caption ``c``) pairs: the
paper's pretraining-loss regulariser, which ImageReward's public code leaves out.

The file reads top to bottom like diffusers' ``train_text_to_image_lora.py``: the set-up both trainers
share (``lifecycle.start_run``: accelerator, models, rewards, prompts, optimizer, resume), ReFL's data,
the loop, the wrap-up (``lifecycle.finish_run``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..rewards.base import Reward
from ..rewards.factory import import_object
from .attribute import AttributeConcentrationTerm
from .checkpoint import save_checkpoint
from .common import (
    Components,
    decode_latents,
    denoise,
    denoising_loss,
    encode_images,
    encode_prompts,
    guided_noise_prediction,
    initial_latents,
    noised_batch,
    predict_x0,
)
from .config import TrainConfig
from .data import CaptionedImages, PromptSampler, step_generator
from .lifecycle import TrainResult, finish_run, prepare_regularizer, resume, start_run
from .validation import validate

logger = logging.getLogger(__name__)


def draw_refl_step(step_range: tuple[int, int] | list[int], generator: torch.Generator) -> int:
    """The denoising step that takes the gradient, drawn uniformly from ``[start, end)`` (0-based indices of
    the sampler's steps): ImageReward (arXiv 2304.05977) Algorithm 1, ``t ← rand(T1, T2)``."""
    start, end = step_range
    if not 0 <= start < end:
        raise ValueError(f"refl_step_range must be [start, end) with 0 <= start < end, not {list(step_range)}.")
    return int(torch.randint(start, end, (1,), generator=generator))


def reward_feedback_loss(scores: torch.Tensor, threshold: float, weight: float) -> torch.Tensor:
    """ReFL's reward term, ImageReward Eq. (4) with ReLU: ``λ · mean(relu(α − r))``; scores above ``α``
    (``threshold``) contribute nothing, ``λ`` is ``weight``."""
    return weight * F.relu(threshold - scores).mean()


def refl_loss(
    config: TrainConfig,
    components: Components,
    reward: Reward,
    prompts: list[str],
    generator: torch.Generator,
    *,
    unet: torch.nn.Module | None = None,
    sampling_unet: torch.nn.Module | None = None,
    regularizer: CaptionedImages | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attribute: AttributeConcentrationTerm | None = None,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One micro-batch of ReFL: returns ``(loss, logs, reward scores)``.

    ``unet`` (default ``components.unet``) is the (possibly DDP-wrapped) model that takes the gradient
    step; ``sampling_unet`` (default ``unet``) the same weights unwrapped, for the no-gradient part (no
    needless DDP bookkeeping there). ``regularizer`` adds the denoising loss on its (image, caption)
    pairs; ``attribute`` CoMat's attribute-concentration loss on the gradient step's cross-attention.
    """
    unet = unet if unet is not None else components.unet
    sampling_unet = sampling_unet if sampling_unet is not None else unet
    sampler = components.sampler
    sampler.set_timesteps(config.num_inference_steps, device=device)
    grad_index = draw_refl_step(config.refl_step_range, generator)
    batch_size = len(prompts)
    use_cfg = config.guidance_scale > 1.0

    cond = encode_prompts(components, prompts, device).to(dtype)
    uncond = encode_prompts(components, [""] * batch_size, device).to(dtype) if use_cfg else None
    latents = initial_latents(components, batch_size, config.resolution, generator, device).to(dtype)
    latents = denoise(
        sampling_unet,
        sampler,
        latents,
        cond,
        uncond,
        guidance_scale=config.guidance_scale,
        steps=range(grad_index),
        generator=generator,
    )

    t = sampler.timesteps[grad_index]
    model_input = sampler.scale_model_input(latents, t)
    inputs = [model_input, model_input] if use_cfg else [model_input]
    embeddings = [uncond, cond] if use_cfg else [cond]
    timesteps = [t.expand(batch_size)] * len(inputs)
    target = None
    if regularizer is not None and config.pretrain_loss_weight > 0:
        images, captions = regularizer.sample(config.pretrain_batch_size, generator)
        clean = encode_images(components.vae, images.to(device), generator).to(dtype)
        noisy, pre_timesteps, target = noised_batch(components.noise_scheduler, clean, generator)
        inputs.append(noisy)
        embeddings.append(encode_prompts(components, captions, device).to(dtype))
        timesteps.append(pre_timesteps)
    # One UNet call carries both losses: DDP expects one forward per backward, and one batched
    # call is also faster than two.
    recording = (
        attribute.recording(sampling_unet, tuple(latents.shape[-2:]))
        if attribute is not None
        else contextlib.nullcontext((None, None))
    )
    with recording as (attention_kwargs, recorder):
        output = unet(
            torch.cat(inputs),
            torch.cat(timesteps),
            encoder_hidden_states=torch.cat(embeddings),
            cross_attention_kwargs=attention_kwargs,
        ).sample
    reward_part = output[: (2 if use_cfg else 1) * batch_size]
    if use_cfg:
        output_uncond, output_cond = reward_part.chunk(2)
        guided = guided_noise_prediction(output_uncond, output_cond, config.guidance_scale)
    else:
        guided = reward_part
    x0 = predict_x0(sampler, latents, guided, t.expand(batch_size))
    images = decode_latents(components.vae, x0)
    scores, _ = reward(images, prompts)
    scores = scores.to(device).float()
    reward_loss = reward_feedback_loss(scores, config.reward_threshold, config.reward_loss_weight)

    loss = reward_loss
    logs = {"reward": scores.mean().item(), "reward_loss": reward_loss.item(), "refl_step": float(grad_index)}
    if target is not None:
        pretrain_loss = denoising_loss(output[reward_part.shape[0] :], target)
        loss = loss + config.pretrain_loss_weight * pretrain_loss
        logs["pretrain_loss"] = pretrain_loss.item()
    if attribute is not None:
        conditional_rows = slice(batch_size, 2 * batch_size) if use_cfg else slice(0, batch_size)
        attribute_loss = attribute.loss(recorder, conditional_rows, images, prompts)
        loss = loss + attribute_loss
        logs["attribute_concentration_loss"] = attribute_loss.item()
    logs["loss"] = loss.item()
    return loss, logs, scores.detach()


def train_refl(config: TrainConfig, reward: Reward | None = None) -> TrainResult:
    """Run ReFL as ``config`` says; resumes from the newest checkpoint in ``output_dir`` if any.

    ``reward`` overrides ``config.rewards`` (for Python callers with a reward object in hand). Under a
    multi-process launch, call it through ``run.train``, which leaves the process group afterwards (or call
    ``run.leave_process_group`` yourself once it returns).
    """
    run = start_run(
        config,
        reward,
        total_steps=lambda prompts, num_processes: config.max_train_steps,
        check_reward=require_differentiable,
        use_ema=config.use_ema,
    )
    accelerator, components, unet, sampling_unet = run.accelerator, run.components, run.unet, run.sampling_unet
    parameters, optimizer, lr_scheduler, ema = run.parameters, run.optimizer, run.lr_scheduler, run.ema
    reward, device, weight_dtype, output_dir = run.reward, run.device, run.weight_dtype, run.output_dir

    # Data: prompts sharded by step and process; (image, caption) pairs for the regulariser.
    prompt_sampler = PromptSampler(
        run.prompts, config.train_batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )
    regularizer = prepare_regularizer(run)
    attribute = None
    if config.attribute_concentration_weight > 0:
        grounder = None
        if config.attribute_concentration_grounder is not None:
            spec = dict(config.attribute_concentration_grounder)
            grounder = import_object(spec.pop("name"))(**spec)
        attribute = AttributeConcentrationTerm(
            components.tokenizer, config.attribute_concentration_weight, grounder=grounder
        )

    state = resume(run)  # after every set-up step that draws random numbers
    global_step = state["step"] if state is not None else 0
    history: dict[str, Any] = {}
    if global_step == 0:
        history["before"] = validate(run, "before", 0)

    progress = tqdm(
        total=config.max_train_steps,
        initial=global_step,
        desc="ReFL steps",
        disable=not accelerator.is_local_main_process,
    )
    micro_step = global_step * config.gradient_accumulation_steps
    stop_at = min(config.max_train_steps, config.stop_after_steps or math.inf)
    while global_step < stop_at:
        with accelerator.accumulate(unet):
            generator = step_generator(config.seed, micro_step, accelerator.process_index)
            batch_prompts = prompt_sampler.batch(micro_step)
            with accelerator.autocast():
                loss, logs, scores = refl_loss(
                    config,
                    components,
                    reward,
                    batch_prompts,
                    generator,
                    unet=unet,
                    sampling_unet=sampling_unet,
                    regularizer=regularizer,
                    device=device,
                    dtype=weight_dtype,
                    attribute=attribute,
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        micro_step += 1

        if accelerator.sync_gradients:
            global_step += 1
            if ema is not None:
                ema.step(parameters)
            logs["reward"] = accelerator.gather(scores).mean().item()
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(reward=f"{logs['reward']:.4f}", loss=f"{logs['loss']:.4g}")
            if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
                save_checkpoint(
                    accelerator, output_dir, global_step, {"method": "refl"}, config.checkpoints_total_limit, ema=ema
                )
            if config.validation_steps and global_step % config.validation_steps == 0:
                with _ema_weights(ema, parameters):
                    validate(run, f"step-{global_step}", global_step)
    progress.close()

    finished = global_step >= config.max_train_steps
    if finished and ema is not None:
        ema.copy_to(parameters)
    return finish_run(run, global_step, finished, history)


def require_differentiable(reward: Reward) -> Reward:
    """ReFL back-propagates through the reward: refuse one that is not differentiable, before any step."""
    if not getattr(reward, "differentiable", False):
        raise ValueError(
            "ReFL back-propagates through the reward, so it needs a differentiable one (concept_matching); "
            "for captions, tags and other non-differentiable rewards use method: reward_ranked."
        )
    return reward


class _ema_weights:
    """Swap the EMA weights in for a validation, then put the training weights back."""

    def __init__(self, ema: EMAModel | None, parameters: list[torch.nn.Parameter]) -> None:
        self.ema, self.parameters = ema, parameters

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc: object) -> None:
        if self.ema is not None:
            self.ema.restore(self.parameters)
