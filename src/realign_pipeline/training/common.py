"""Pieces both trainers share: loading the model, LoRA, sampling, the denoising loss, validation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from transformers import CLIPTextModel, CLIPTokenizer

from ..rewards.base import to_pil_images
from .config import TrainConfig
from .data import step_generator

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The Stable Diffusion parts a trainer uses; ``noise_scheduler`` adds noise for the denoising
    loss and defines ``ᾱ_t``, ``sampler`` runs the reverse process."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampler: DDPMScheduler | DDIMScheduler


def load_components(config: TrainConfig) -> Components:
    """Load the base pipeline's parts; VAE and text encoder frozen, the UNet trainable (or LoRA-ready)."""
    source, revision = config.pretrained_model, config.revision
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=revision)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    sampler_class = DDPMScheduler if config.sampler == "ddpm" else DDIMScheduler
    sampler = sampler_class.from_config(noise_scheduler.config)
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    unet.train()
    if config.use_lora:
        add_lora(unet, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        # The reward's gradient also flows back through the (frozen) VAE decoder, whose activations
        # at image resolution dominate memory; recompute them too.
        vae.enable_gradient_checkpointing()
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, sampler)


def add_lora(unet: UNet2DConditionModel, config: TrainConfig) -> None:
    """Freeze the UNet and add a trainable LoRA adapter on the attention projections (peft)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
    )


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


@torch.no_grad()
def encode_prompts(components: Components, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    tokenizer = components.tokenizer
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return components.text_encoder(ids)[0]


def predict_x0(
    scheduler: DDPMScheduler | DDIMScheduler, sample: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean-latent estimate ``x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t`` (or its v-prediction form)."""
    alphas = scheduler.alphas_cumprod.to(sample.device, torch.float32)[timesteps.to(sample.device)]
    alphas = alphas.view(-1, *([1] * (sample.ndim - 1)))
    prediction_type = scheduler.config.prediction_type
    sample32, output32 = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        x0 = (sample32 - (1 - alphas).sqrt() * output32) / alphas.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alphas.sqrt() * sample32 - (1 - alphas).sqrt() * output32
    elif prediction_type == "sample":
        x0 = output32
    else:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}.")
    return x0.to(model_output.dtype)


def guided_noise_prediction(
    noise_uncond: torch.Tensor, noise_cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, Eq. 6, in diffusers' convention):
    ``ε̂ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅))`` with ``w`` = ``guidance_scale`` (1: the conditional
    prediction alone)."""
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def guided_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guided model output (a plain conditional call when ``uncond`` is None)."""
    if uncond is None:
        return unet(latents, timestep, encoder_hidden_states=cond).sample
    output = unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=torch.cat([uncond, cond])).sample
    output_uncond, output_cond = output.chunk(2)
    return guided_noise_prediction(output_uncond, output_cond, guidance_scale)


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    sampler: DDPMScheduler | DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float,
    steps: Iterable[int],
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Run the reverse process over the step indices ``steps`` of ``sampler.timesteps`` (set beforehand)."""
    for index in steps:
        t = sampler.timesteps[index]
        model_output = guided_noise(unet, sampler.scale_model_input(latents, t), t, cond, uncond, guidance_scale)
        latents = sampler.step(model_output, t, latents, generator=generator).prev_sample
    return latents


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in ``[-1, 1]`` (keeps the graph when called with grad enabled)."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.clamp(-1, 1)


def initial_latents(
    components: Components, batch_size: int, resolution: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    shape = (batch_size, components.unet.config.in_channels, resolution // scale, resolution // scale)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (noise * components.sampler.init_noise_sigma).to(device)


@torch.no_grad()
def generate(
    components: Components,
    unet: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: TrainConfig,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full sampling, one seed per prompt: returns ``(final latents, images in [-1, 1])`` on ``device``.

    Each sample has its own generator (initial noise and DDPM's step noise), so an image depends on
    its prompt and seed only, not on what else shares its batch.
    """
    sampler = components.sampler
    sampler.set_timesteps(config.num_inference_steps, device=device)
    latents, images = [], []
    for first in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[first : first + batch_size])
        generators = [step_generator(seed) for seed in seeds[first : first + batch_size]]
        latent = torch.cat([initial_latents(components, 1, config.resolution, g, device) for g in generators])
        cond = encode_prompts(components, chunk_prompts, device).to(dtype)
        uncond = (
            encode_prompts(components, [""] * len(chunk_prompts), device).to(dtype)
            if config.guidance_scale > 1
            else None
        )
        latent = denoise(
            unet,
            sampler,
            latent.to(dtype),
            cond,
            uncond,
            guidance_scale=config.guidance_scale,
            steps=range(len(sampler.timesteps)),
            generator=generators,
        )
        latents.append(latent)
        images.append(decode_latents(components.vae, latent))
    return torch.cat(latents), torch.cat(images)


def noised_batch(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, target)`` for the denoising loss ``‖target − model(x_t, t)‖²`` at uniform random ``t``."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[-1, 1]`` images to scaled latents (a sample of the posterior, seeded)."""
    distribution = vae.encode(images.to(vae.dtype)).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=generator, dtype=torch.float32).to(distribution.mean)
    return (distribution.mean + distribution.std * noise) * vae.config.scaling_factor


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def score_images(rewards: Any, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each reward's scores and the weighted total (``"total"``), detached on the CPU."""
    with torch.no_grad():
        total, info = rewards(images, list(prompts))
    scores = {name: info[name] for name in getattr(rewards, "rewards", {})}
    scores["total"] = total.detach().float().cpu()
    return scores


def image_grid(images: torch.Tensor, columns: int | None = None) -> PIL.Image.Image:
    """A grid of ``[-1, 1]`` images, one row unless ``columns`` is given."""
    pil_images = to_pil_images(images)
    columns = columns or len(pil_images)
    rows = (len(pil_images) + columns - 1) // columns
    width, height = pil_images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(pil_images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The config flattened for trackers (TensorBoard's hparams take scalars and strings only),
    credentials redacted."""
    flat = {}
    for key, value in config.to_public_dict().items():
        flat[key] = json.dumps(value) if isinstance(value, (list, dict)) or value is None else value
    return flat


def place_components(components: Components, device: torch.device, weight_dtype: torch.dtype, use_lora: bool) -> None:
    """Move the models to ``device``: frozen VAE and text encoder in the compute dtype, trainable
    weights in float32 (with LoRA the frozen base UNet weights go to the compute dtype too)."""
    if weight_dtype == torch.float32:
        for module in (components.vae, components.text_encoder, components.unet):
            module.to(device)
        return
    components.vae.to(device, dtype=weight_dtype)
    components.text_encoder.to(device, dtype=weight_dtype)
    components.unet.to(device, dtype=weight_dtype if use_lora else torch.float32)
    cast_training_params(components.unet, dtype=torch.float32)


def make_optimizer_and_scheduler(
    config: TrainConfig, parameters: Iterable[torch.nn.Parameter], num_training_steps: int, num_processes: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW on ``parameters`` and the configured LR schedule.

    A prepared scheduler is stepped once per process by accelerate, so its step counts are scaled by
    ``num_processes``.
    """
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=num_training_steps * num_processes,
    )
    return optimizer, lr_scheduler
