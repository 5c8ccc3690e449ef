"""Train the shapes world: a small Stable Diffusion pipeline and a small BLIP captioner, from scratch.

    realign world train --output outputs/shapes-world --set seed=0

Stages, each resumable from an atomic checkpoint in ``<output>-work/``:

1. tokenizers: a CLIP BPE tokenizer and a BERT word-piece tokenizer for the world's words;
2. ``vae``: an ``AutoencoderKL`` (64 px → 16×16×4), trained on 32 px crops (it is fully
   convolutional, so crops teach it the same map at a quarter of the cost);
3. latents: every training image encoded once with the finished VAE (posterior mean), and the
   VAE's ``scaling_factor`` set to 1/std of those latents, as Stable Diffusion's 0.18215 was;
4. ``unet``: a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained jointly with the
   denoising loss (ε-prediction, Min-SNR-5 weighting, 10% empty captions for guidance) on the
   cached latents, with an EMA of both;
5. ``captioner``: a ``BlipForConditionalGeneration`` trained to caption rendered scenes;
6. the pipeline folder (``save_pretrained``, safetensors; UNet and VAE stored in float16, which
   diffusers loads back as float32), a quick judged evaluation, sample images and a model card.

Training images never contain the held-out colour-shape pairings of ``data.HELD_OUT_PAIRS``.
Each stage restarts from its latest checkpoint (weights, optimizer, EMA, step and RNG
states), so an interrupted run continues where it stopped and, on the same number of threads,
produces the same weights as an uninterrupted one. Raising a stage's step count and running
again continues that stage from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from ..errors import UsageError
from ..options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Limit, check_fields
from ..toy_pipeline import write_clip_tokenizer_files
from .data import EVAL_CATEGORIES, HELD_OUT_PAIRS, IMAGE_SIZE, VOCABULARY, evaluation_prompts, make_sample
from .evaluate import category_result
from .judge import judge

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# What each numeric WorldConfig option may be (``options.Limit``), checked on construction.
WORLD_LIMITS: dict[str, Limit] = {
    "num_threads": AT_LEAST_ONE,
    "num_images": AT_LEAST_ONE,
    "num_captioner_images": AT_LEAST_ONE,
    "vae_channels": AT_LEAST_ONE,
    "vae_steps": NON_NEGATIVE,
    "vae_batch_size": AT_LEAST_ONE,
    "vae_crop": Limit(4, IMAGE_SIZE, multiple_of=4),  # the VAE downsamples by 4
    "vae_lr": POSITIVE,
    "vae_kl_weight": NON_NEGATIVE,
    "text_hidden_size": AT_LEAST_ONE,
    "text_layers": AT_LEAST_ONE,
    "unet_channels": AT_LEAST_ONE,
    "unet_heads": AT_LEAST_ONE,
    "unet_steps": NON_NEGATIVE,
    "unet_batch_size": AT_LEAST_ONE,
    "unet_lr": POSITIVE,
    "warmup_steps": NON_NEGATIVE,
    "min_lr_ratio": Limit(0, 1),
    "ema_decay": Limit(0, 1, high_open=True),
    "caption_dropout": Limit(0, 1),
    "snr_gamma": POSITIVE,
    "beta_start": Limit(0, 1, low_open=True, high_open=True),
    "beta_end": Limit(0, 1, low_open=True, high_open=True),
    "captioner_hidden_size": AT_LEAST_ONE,
    "captioner_layers": AT_LEAST_ONE,
    "captioner_steps": NON_NEGATIVE,
    "captioner_batch_size": AT_LEAST_ONE,
    "captioner_lr": POSITIVE,
    "captioner_max_length": AT_LEAST_ONE,
    "checkpoint_every": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
    "eval_prompts_per_category": NON_NEGATIVE,
    "eval_steps": AT_LEAST_ONE,
    "guidance_scale": NON_NEGATIVE,
}
WORLD_CHOICES: dict[str, tuple[str, ...]] = {
    "captioner_split": ("train", "all", "held_out"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}


@dataclass
class WorldConfig:
    """Everything that decides the trained world. Defaults took about 80 min on a shared 2-core CPU."""

    output_dir: str = "outputs/shapes-world"
    work_dir: str | None = None  # checkpoints and caches; default "<output_dir>-work"
    seed: int = 0
    # UNet s/step measured on 2 cores: idle 0.53 with two threads, 0.87 with one; on a machine shared with
    # other jobs 1.4-2.7 with two, 1.3-1.8 with one, and 4-13 with two busy-waiting OpenMP threads (hence
    # OMP_WAIT_POLICY=PASSIVE, set by ``__main__``). Pass ``--num-threads 1`` on a crowded machine.
    num_threads: int = 2
    num_images: int = 20_000  # training scenes (held-out pairings excluded)
    num_captioner_images: int = 16_000
    captioner_split: str = "all"  # the reward model knows every pairing, as BLIP-2 knows more than SD binds

    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6

    # text encoder + UNet
    text_hidden_size: int = 64
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: tuple[int, ...] = (2, 4, 8)
    unet_steps: int = 4000
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    beta_schedule: str = "linear"  # DDPM's 1e-4..0.02: 16×16 latents need more noise than SD's schedule gives
    beta_start: float = 1e-4
    beta_end: float = 0.02

    # captioner
    captioner_hidden_size: int = 96
    captioner_layers: int = 3
    captioner_steps: int = 2000
    captioner_batch_size: int = 64
    captioner_lr: float = 5e-4
    captioner_max_length: int = 24

    # bookkeeping
    checkpoint_every: int = 200
    log_every: int = 50
    eval_prompts_per_category: int = 16  # development prompts judged at the end (at most 16 per category exist)
    eval_steps: int = 25
    guidance_scale: float = 4.0

    def __post_init__(self) -> None:
        check_fields(self, WORLD_LIMITS, WORLD_CHOICES)
        if len(self.unet_channels) != len(self.unet_heads):
            raise UsageError(
                f"unet_heads must have one entry per unet_channels entry ({len(self.unet_channels)}), "
                f"got {list(self.unet_heads)}"
            )

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(self.output_dir).rstrip("/") + "-work")


# ---------------------------------------------------------------------------------------------
# checkpoints and schedules


# Stage checkpoints are safetensors files: tensors by name, and the rest of the state (step, optimizer
# hyper-parameters, where each tensor sits) as JSON in the header, so resuming never unpickles anything.
CHECKPOINT_SUFFIX = ".safetensors"
# The pickled checkpoints of earlier versions; they are refused, never loaded (a planted pickle would run code).
LEGACY_CHECKPOINT_SUFFIX = ".ckpt"
_STATE_KEY = "realign_pipeline.state"


def checkpoint_path(work: Path, stage: str) -> Path:
    """Where ``stage``'s checkpoint lives in the work folder."""
    return Path(work) / f"{stage}{CHECKPOINT_SUFFIX}"


def _encode(value: object, tensors: dict[str, torch.Tensor], where: str) -> object:
    """``value`` as JSON, each tensor replaced by a reference to ``tensors[where]``."""
    if isinstance(value, torch.Tensor):
        # A clone: safetensors refuses tensors that share memory, and a checkpoint must not alias live weights.
        tensors[where] = value.detach().to("cpu").clone().contiguous()
        return {"tensor": where}
    if isinstance(value, dict):
        # Pairs, not a JSON object: optimizer states are keyed by int parameter ids.
        return {"dict": [[key, _encode(item, tensors, f"{where}/{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{where}/{index}") for index, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} at {where!r} in a safetensors checkpoint")


def _decode(encoded: dict, tensors: dict[str, torch.Tensor]) -> object:
    """The inverse of ``_encode``."""
    ((kind, content),) = encoded.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in content}
    if kind in ("list", "tuple"):
        items = [_decode(item, tensors) for item in content]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return content
    raise ValueError(f"unknown entry {kind!r} in a checkpoint's state")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (nested dicts, lists, tensors and JSON scalars) atomically as one safetensors file:
    a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={_STATE_KEY: json.dumps(structure)})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or ``None`` when the stage has not started.

    Only safetensors are read. A pickled checkpoint of an earlier version beside it (``<stage>.ckpt``) is
    refused with an error instead of being loaded, and a file that is not safetensors raises ``ValueError``.
    """
    path = Path(path)
    legacy = path.with_suffix(LEGACY_CHECKPOINT_SUFFIX)
    if not path.exists():
        if legacy.exists():
            raise RuntimeError(
                f"{legacy} is a pickled checkpoint of an earlier version; it is not loaded, since unpickling runs "
                f"code. Delete it to restart the stage (checkpoints are now {CHECKPOINT_SUFFIX} files)."
            )
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a safetensors checkpoint ({error}); delete it to restart the stage"
        ) from error
    if _STATE_KEY not in metadata:
        raise ValueError(f"{path} holds no training state (no {_STATE_KEY!r} entry in its header)")
    return _decode(json.loads(metadata[_STATE_KEY]), tensors)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio · base_lr``: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int, decay: float) -> None:
    """EMA with a warm-up (the first steps would otherwise be stuck near the random init)."""
    rate = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, params, 1 - rate)


class StageLogger:
    """A tqdm bar plus plain log lines every ``every`` steps (the bar alone is unreadable in a log file)."""

    def __init__(self, name: str, total: int, initial: int, every: int, log_file: Path):
        self.name, self.every, self.log_file = name, every, log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=initial, desc=name, mininterval=5.0, dynamic_ncols=True)
        self.start_step, self.start_time = initial, time.time()
        self.losses: list[float] = []

    def step(self, step: int, loss: float, **extra: float) -> None:
        self.losses.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if (step + 1) % self.every == 0:
            elapsed = time.time() - self.start_time
            record = {
                "stage": self.name,
                "step": step + 1,
                "loss": float(np.mean(self.losses)),
                "s_per_step": elapsed / max(1, step + 1 - self.start_step),
                **extra,
            }
            self.losses = []
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.start_time


# ---------------------------------------------------------------------------------------------
# data


def render_dataset(seed: int, num_images: int, split: str) -> tuple[np.ndarray, list[str]]:
    """``num_images`` scenes of ``split`` as a uint8 array ``(N, 64, 64, 3)`` and their captions."""
    images = np.empty((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for index in tqdm(range(num_images), desc=f"render {split}", mininterval=5.0):
        sample = make_sample(seed, index, split)
        images[index] = np.asarray(sample.image)
        captions.append(sample.scene.caption)
    return images, captions


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1], the range diffusers' VAEs work in (and BLIP's with mean = std = 0.5)."""
    images = torch.tensor(images) if isinstance(images, np.ndarray) else images
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------
# models


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose merges spell every world word as one token."""
    write_clip_tokenizer_files(folder, VOCABULARY)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_vae(config: WorldConfig) -> AutoencoderKL:
    """64 px ↔ 16×16×4; no mid-block attention, so the model is fully convolutional."""
    torch.manual_seed(config.seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(config: WorldConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(config.seed + 1)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-5,
        )
    )


def build_unet(config: WorldConfig) -> UNet2DConditionModel:
    """Cross-attention at 16×16 and 8×8 (where RealignDiff's masks act), plain ResNets at 4×4."""
    torch.manual_seed(config.seed + 2)
    levels = len(config.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        # diffusers' historical naming: this sets the number of heads per block.
        attention_head_dim=config.unet_heads,
        cross_attention_dim=config.text_hidden_size,
        norm_num_groups=8,
    )


def build_noise_scheduler(config: WorldConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_inference_scheduler(config: WorldConfig) -> DDIMScheduler:
    """Stable Diffusion's DDIM settings with this world's betas."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_captioner_tokenizer() -> BertTokenizer:
    """A word-level BERT tokenizer for the world's words (every caption word is one token)."""
    words = list(BERT_SPECIAL_TOKENS) + list(VOCABULARY)
    return BertTokenizer(vocab={word: index for index, word in enumerate(words)})


def build_captioner(config: WorldConfig, tokenizer: BertTokenizer) -> BlipForConditionalGeneration:
    """A tiny BLIP: 8 px patches over 64 px images, a causal text decoder with cross-attention.

    The decoder's start token is ``[CLS]``, which the processor puts first, so teacher-forced
    training and ``generate`` (which overwrites the first token with ``bos_token_id``) agree.
    """
    torch.manual_seed(config.seed + 3)
    hidden = config.captioner_hidden_size
    vision = BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=config.captioner_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=config.captioner_layers,
        num_attention_heads=4,
        max_position_embeddings=config.captioner_max_length,
        encoder_hidden_size=hidden,
        bos_token_id=tokenizer.cls_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    blip_config = BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=hidden)
    return BlipForConditionalGeneration(blip_config)


def build_captioner_processor(tokenizer: BertTokenizer) -> BlipProcessor:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# stages


def train_vae(config: WorldConfig, images: np.ndarray) -> tuple[AutoencoderKL, dict]:
    """Reconstruction (L1 + MSE) with a tiny KL term, on random crops."""
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 10)
    path = checkpoint_path(config.work, "vae")
    step = start = resume_stage(path, vae, optimizer, generator)
    pixels = torch.from_numpy(images)  # uint8; converted per batch to keep memory at a quarter
    logger = StageLogger("vae", config.vae_steps, step, config.log_every, config.work / "log.jsonl")
    vae.train()
    while step < config.vae_steps:
        set_lr(optimizer, lr_at(step, config.vae_lr, config.vae_steps, 50, config.min_lr_ratio))
        index = torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)
        x0, y0 = torch.randint(IMAGE_SIZE - config.vae_crop + 1, (2,), generator=generator).tolist()
        batch = to_model_range(pixels[index, y0 : y0 + config.vae_crop, x0 : x0 + config.vae_crop])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        reconstruction_loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        loss = reconstruction_loss + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        logger.step(step, reconstruction_loss.item())
        step += 1
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            save_stage(path, step, vae, optimizer, generator)
    seconds = logger.close()
    vae.eval()
    return vae, {"steps": step, "resumed_from": start, "seconds_this_run": seconds, "parameters": num_parameters(vae)}


@torch.no_grad()
def encode_latents(config: WorldConfig, vae: AutoencoderKL, images: np.ndarray, vae_steps: int) -> torch.Tensor:
    """Posterior means of every image, cached per (VAE step, dataset size)."""
    path = config.work / f"latents-vae{vae_steps}-n{len(images)}.safetensors"
    if path.exists():
        return load_file(path)["latents"]
    chunks = []
    for start in tqdm(range(0, len(images), 256), desc="encode", mininterval=5.0):
        chunks.append(vae.encode(to_model_range(images[start : start + 256])).latent_dist.mean)
    latents = torch.cat(chunks)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"latents": latents.contiguous()}, tmp)
    os.replace(tmp, path)
    return latents


def train_unet(
    config: WorldConfig,
    latents: torch.Tensor,
    captions: list[str],
    tokenizer: CLIPTokenizer,
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    """Joint denoising training of the UNet and the text encoder; returns their EMA weights."""
    unet, text_encoder = build_unet(config), build_text_encoder(config, tokenizer)
    noise_scheduler = build_noise_scheduler(config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(config.seed + 20)
    path = checkpoint_path(config.work, "unet")
    step = start = resume_stage(path, torch.nn.ModuleList([unet, text_encoder]), optimizer, generator, ema)

    def token_ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")[
            "input_ids"
        ]

    ids, empty_ids = token_ids(captions), token_ids([""])
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-γ for ε-prediction: weight min(SNR, γ)/SNR stops the easy low-noise steps dominating.
    loss_weights = torch.clamp(snr, max=config.snr_gamma) / snr

    logger = StageLogger("unet", config.unet_steps, step, config.log_every, config.work / "log.jsonl")
    unet.train()
    text_encoder.train()
    while step < config.unet_steps:
        set_lr(optimizer, lr_at(step, config.unet_lr, config.unet_steps, config.warmup_steps, config.min_lr_ratio))
        index = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < config.caption_dropout
        batch_ids = torch.where(dropped[:, None], empty_ids, ids[index])
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        encoder_hidden_states = text_encoder(batch_ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(ema, params, step, config.ema_decay)
        logger.step(step, per_sample.mean().item())
        step += 1
        if step % config.checkpoint_every == 0 or step == config.unet_steps:
            save_stage(path, step, torch.nn.ModuleList([unet, text_encoder]), optimizer, generator, ema)
    seconds = logger.close()
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    unet.eval()
    text_encoder.eval()
    info = {
        "steps": step,
        "resumed_from": start,
        "seconds_this_run": seconds,
        "unet_parameters": num_parameters(unet),
        "text_encoder_parameters": num_parameters(text_encoder),
    }
    return unet, text_encoder, info


def train_captioner(
    config: WorldConfig, images: np.ndarray, captions: list[str], tokenizer: BertTokenizer
) -> tuple[BlipForConditionalGeneration, dict]:
    """Teacher-forced captioning loss (BLIP's own, with its label smoothing), pads ignored."""
    model = build_captioner(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.captioner_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 30)
    path = checkpoint_path(config.work, "captioner")
    step = start = resume_stage(path, model, optimizer, generator)
    encoded = tokenizer(captions, padding="max_length", max_length=config.captioner_max_length, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    pixels = torch.from_numpy(images)
    logger = StageLogger("captioner", config.captioner_steps, step, config.log_every, config.work / "log.jsonl")
    model.train()
    while step < config.captioner_steps:
        set_lr(optimizer, lr_at(step, config.captioner_lr, config.captioner_steps, 100, config.min_lr_ratio))
        index = torch.randint(len(pixels), (config.captioner_batch_size,), generator=generator)
        labels = ids[index].masked_fill(mask[index] == 0, -100)
        output = model(
            pixel_values=to_model_range(pixels[index]), input_ids=ids[index], attention_mask=mask[index], labels=labels
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        logger.step(step, output.loss.item())
        step += 1
        if step % config.checkpoint_every == 0 or step == config.captioner_steps:
            save_stage(path, step, model, optimizer, generator)
    seconds = logger.close()
    model.eval()
    return model, {
        "steps": step,
        "resumed_from": start,
        "seconds_this_run": seconds,
        "parameters": num_parameters(model),
    }


def save_stage(
    path: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: list[torch.Tensor] | None = None,
) -> None:
    save_checkpoint(
        path,
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema": ema,
        },
    )


def resume_stage(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: list[torch.Tensor] | None = None,
) -> int:
    """Load the stage's latest checkpoint into the given objects; returns its step (0 if none)."""
    state = load_checkpoint(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if ema is not None:
        for average, saved in zip(ema, state["ema"]):
            average.copy_(saved)
    tqdm.write(f"resumed {path.name} at step {state['step']}")
    return state["step"]


# ---------------------------------------------------------------------------------------------
# export


def save_world(
    config: WorldConfig,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    captioner: BlipForConditionalGeneration,
    captioner_processor: BlipProcessor,
) -> Path:
    """An ordinary Stable Diffusion folder plus ``captioner/``; UNet and VAE weights in float16."""
    output = Path(config.output_dir)
    pipe = StableDiffusionPipeline(
        vae=vae.to(torch.float16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.to(torch.float16),
        scheduler=build_inference_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output, safe_serialization=True)
    vae.to(torch.float32)
    unet.to(torch.float32)
    captioner.save_pretrained(output / "captioner", safe_serialization=True)
    captioner_processor.save_pretrained(output / "captioner")
    return output


@torch.no_grad()
def vae_roundtrip_accuracy(vae: AutoencoderKL, num_images: int = 200, seed: int = 0) -> dict:
    """The judge on encoded-then-decoded renders: the ceiling the VAE puts on generated images."""
    samples = [make_sample(seed + 2, index, "all") for index in range(num_images)]
    pixels = to_model_range(np.stack([np.asarray(sample.image) for sample in samples]))
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    passed = [judge(image, sample.scene.caption).passed for image, sample in zip(images, samples)]
    return {"n": num_images, "passed": float(np.mean(passed)), "mse": float(((decoded - pixels) ** 2).mean())}


def judged_prompt_sets(config: WorldConfig) -> dict[str, list[str]]:
    """The prompts judged while building the world, by ``"<split>/<category>"``: development prompts only.

    Seen pairings first, then held-out ones (``data.DEVELOPMENT_SPLITS``), ``eval_prompts_per_category`` each
    (at most ``data.DEVELOPMENT_PROMPTS_PER_CATEGORY``). The evaluation splits' prompts are for ``realign eval``'s
    final tables alone, so no choice made while building the world can have looked at them.
    """
    return {
        f"{split}/{category}": evaluation_prompts(category, split, config.eval_prompts_per_category, seed=config.seed)
        for split in ("development_seen", "development")
        for category in EVAL_CATEGORIES
    }


@torch.no_grad()
def evaluate_world(config: WorldConfig) -> dict:
    """Load the saved folder as a user would, generate the development prompts, judge them."""
    pipe = StableDiffusionPipeline.from_pretrained(config.output_dir)
    pipe.set_progress_bar_config(disable=True)
    results: dict = {}
    grid = []
    for key, prompts in judged_prompt_sets(config).items():
        category = key.split("/")[1]
        generator = torch.Generator().manual_seed(config.seed)
        images = pipe(
            prompts,
            num_inference_steps=config.eval_steps,
            guidance_scale=config.guidance_scale,
            generator=generator,
        ).images
        verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
        # Counted as `realign eval` counts them, as fractions here.
        counts = category_result(category, verdicts, seconds=0.0)
        results[key] = {
            "n": counts.n,
            "passed": counts.passed / counts.n,
            "objects_present": counts.objects_present / counts.n,
            "binding_correct": counts.binding_correct / counts.n,
            "count_correct": counts.count_correct / counts.n,
            "relation_correct": None if counts.relation_correct is None else counts.relation_correct / counts.n,
            "examples": [v.as_dict() for v in verdicts[:4]],
        }
        grid.append(images[:8])
    results["vae_roundtrip"] = vae_roundtrip_accuracy(pipe.vae, seed=config.seed)
    sheet = PIL.Image.new("RGB", (IMAGE_SIZE * 8, IMAGE_SIZE * len(grid)))
    for row, images in enumerate(grid):
        for column, image in enumerate(images):
            sheet.paste(image, (column * IMAGE_SIZE, row * IMAGE_SIZE))
    sheet.save(Path(config.output_dir) / "samples.png")
    return results


# The world's model card (huggingface_hub's ``ModelCard.from_template``, Jinja2).
WORLD_CARD_TEMPLATE = """---
{{ card_data }}
---

# shapes-world: a small Stable Diffusion trained from scratch on coloured shapes

The built-in world of realign-pipeline (RealignDiff for diffusers): a standard diffusers
`StableDiffusionPipeline` (`AutoencoderKL`, `CLIPTextModel` + `CLIPTokenizer`,
`UNet2DConditionModel`, `DDIMScheduler`) that draws 64×64 images of one to three coloured
shapes from T2I-CompBench-style prompts, plus a small BLIP captioner (`captioner/`,
`BlipForConditionalGeneration` + `BlipProcessor`) for the caption rewards. Everything was
trained from random initialisation by `realign_pipeline.shapes.train_world` on procedurally
rendered data; no external data or pretrained weights were used.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{{ folder_name }}")   # diffusers 0.42.1
image = pipe("a red circle on the left of a blue square", num_inference_steps=25, guidance_scale=4.0).images[0]
```

## Data

`realign_pipeline.shapes.data`: {{ config.num_images }} scenes (seed {{ config.seed }}) of circles, squares
and triangles in six colours (red, green, blue, yellow, purple, white) on a dark background;
captions of four kinds: single ("a red circle"), binding ("a red circle and a blue square",
three objects with commas), relation ("a green triangle on the left of a yellow circle"; also
"on the right of", "above", "below") and count ("two red circles", "three blue squares",
"two red circles and a green triangle"). **Held out:** the pairings {{ held_out }} never appear in
the diffusion model's training images; evaluation prompts that name them measure compositional
generalisation. The captioner was trained on {{ config.num_captioner_images }} scenes drawn from
`{{ config.captioner_split }}` pairings (the reward side is meant to know the whole world, as
BLIP-2 knows far more than Stable Diffusion binds correctly).

## Training (one command, resumable, reproducible from the seed)

```
realign world train --output {{ config.output_dir }} --set seed={{ config.seed }}
```

1. VAE: L1 + MSE reconstruction with KL weight {{ config.vae_kl_weight }}, {{ config.vae_steps }} steps of batch
   {{ config.vae_batch_size }} on {{ config.vae_crop }} px crops, AdamW lr {{ config.vae_lr }}; `scaling_factor`
   set to 1/std of the training latents.
2. Text encoder and UNet, jointly: ε-prediction, DDPM betas `{{ config.beta_schedule }}`
   {{ config.beta_start }}..{{ config.beta_end }}, Min-SNR-{{ config.snr_gamma }} weighting, {{ caption_dropout }}
   empty captions, {{ config.unet_steps }} steps of batch {{ config.unet_batch_size }}, AdamW lr
   {{ config.unet_lr }} (warm-up {{ config.warmup_steps }}, cosine to {{ config.min_lr_ratio }}×),
   EMA {{ config.ema_decay }} (the EMA weights are saved).
3. Captioner: teacher-forced captioning loss, {{ config.captioner_steps }} steps of batch
   {{ config.captioner_batch_size }}, AdamW lr {{ config.captioner_lr }}.

Machine: {{ machine }}, {{ config.num_threads }} threads. Wall time: {{ minutes }} min
(this run; a resumed run counts only its own part).

{{ stage_lines }}

UNet and VAE weights are stored in float16 (diffusers loads them as float32); the text
encoder and captioner in float32 (transformers would keep float16).

## Judged evaluation

`realign_pipeline.shapes.judge` (palette segmentation and rule-based shape classification,
no learned model) on development prompts (`development_seen`: seen pairings; `development`: naming a
held-out pairing), never on the evaluation prompts of `realign eval`, which are kept for its final tables;
{{ config.eval_prompts_per_category }} prompts per row, DDIM {{ config.eval_steps }} steps, guidance
{{ config.guidance_scale }}, one seed. "passed" needs every object present, every colour on the right
shape, exact counts with nothing extra, and the relation.

| prompts | n | passed | objects present | binding | count | relation |
|---|---|---|---|---|---|---|
{{ rows }}

{{ roundtrip_line }}

`samples.png`: first eight images of each row above, in the same order (seen then held-out pairings;
binding, relation, count).

## Files

{{ file_lines }}
- total weights: {{ total_mb }} MB

## Configuration

```json
{{ config_json }}
```
"""


def world_card_data() -> ModelCardData:
    """The Hub metadata of a shapes-world pipeline folder's card: the trained world's and a grounded one's."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["text-to-image", "stable-diffusion", "realign-pipeline", "shapes-world", "synthetic-data"],
        pipeline_tag="text-to-image",
    )


def weight_file_lines(folder: Path) -> tuple[list[str], int]:
    """One Markdown bullet per safetensors file under ``folder`` (its path and size in MB), and their total bytes."""
    sizes = {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*.safetensors"))}
    return [f"- `{name}`: {size / 1e6:.2f} MB" for name, size in sizes.items()], sum(sizes.values())


def write_model_card(config: WorldConfig, info: dict) -> None:
    """README.md in the output folder (``WORLD_CARD_TEMPLATE``): what the models are and exactly how they were
    made."""
    from huggingface_hub import ModelCard

    output = Path(config.output_dir)
    file_lines, total_bytes = weight_file_lines(output)
    evaluation = dict(info.get("evaluation", {}))
    roundtrip = evaluation.pop("vae_roundtrip", None)
    roundtrip_line = (
        f"VAE round trip (encode, decode, judge {roundtrip['n']} rendered scenes): passed {roundtrip['passed']:.3f}, "
        f"MSE {roundtrip['mse']:.4f} (images in [-1, 1]); the ceiling the autoencoder puts on every row above."
        if roundtrip
        else ""
    )
    rows = "\n".join(
        f"| {key} | {value['n']} | {value['passed']:.2f} | {value['objects_present']:.2f} | "
        f"{value['binding_correct']:.2f} | {value['count_correct']:.2f} | "
        f"{'' if value['relation_correct'] is None else format(value['relation_correct'], '.2f')} |"
        for key, value in evaluation.items()
    )
    card = ModelCard.from_template(
        world_card_data(),
        template_str=WORLD_CARD_TEMPLATE,
        config=config,
        folder_name=output.name,
        held_out=", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS)),
        caption_dropout=f"{config.caption_dropout:.0%}",
        machine=info["machine"],
        minutes=f"{info['total_seconds'] / 60:.1f}",
        stage_lines="\n".join(f"- `{name}`: {json.dumps(value)}" for name, value in info["stages"].items()),
        rows=rows,
        roundtrip_line=roundtrip_line,
        file_lines="\n".join(file_lines),
        total_mb=f"{total_bytes / 1e6:.2f}",
        config_json=json.dumps(dataclasses.asdict(config), indent=2, default=str),
    )
    card.save(output / "README.md")


# ---------------------------------------------------------------------------------------------
# main


def train_world(config: WorldConfig) -> dict:
    """Run (or resume) every stage and write the pipeline folder; returns the run's summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _train_world(config)
    finally:
        torch.set_num_threads(threads)  # a caller's setting survives (tests run this in-process)


def _train_world(config: WorldConfig) -> dict:
    start = time.time()
    config.work.mkdir(parents=True, exist_ok=True)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (config.work / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    info: dict = {"stages": {}, "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores visible)"}

    tokenizer = build_tokenizer(config.work / "clip-tokenizer")
    captioner_tokenizer = build_captioner_tokenizer()

    images, captions = render_dataset(config.seed, config.num_images, "train")
    vae, info["stages"]["vae"] = train_vae(config, images)
    latents = encode_latents(config, vae, images, info["stages"]["vae"]["steps"])
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    info["stages"]["vae"]["scaling_factor"] = scaling_factor
    info["stages"]["vae"]["latent_mean"] = float(latents.mean())

    unet, text_encoder, info["stages"]["unet"] = train_unet(config, latents * scaling_factor, captions, tokenizer)
    del latents

    captioner_images, captioner_captions = images, captions
    if config.captioner_split != "train":
        captioner_images, captioner_captions = render_dataset(
            config.seed + 1, config.num_captioner_images, config.captioner_split
        )
    captioner, info["stages"]["captioner"] = train_captioner(
        config, captioner_images, captioner_captions, captioner_tokenizer
    )

    save_world(config, vae, text_encoder, tokenizer, unet, captioner, build_captioner_processor(captioner_tokenizer))
    if config.eval_prompts_per_category > 0:
        info["evaluation"] = evaluate_world(config)
    info["total_seconds"] = time.time() - start
    (output / "training_info.json").write_text(json.dumps(info, indent=2))
    write_model_card(config, info)
    tqdm.write(f"shapes world written to {output} in {info['total_seconds'] / 60:.1f} min")
    return info


def parse_args(argv: list[str] | None = None) -> WorldConfig:
    """``[--config FILE] [--set key=value ...] [--output DIR]`` (``realign world train``'s arguments) as a
    ``WorldConfig``; a bad option is a ``UsageError`` naming its source."""
    from ..options import read_options
    from .command import add_world_train_arguments

    parser = argparse.ArgumentParser(
        prog="python -m realign_pipeline.shapes.train_world", description=__doc__.split("\n\n")[0]
    )
    add_world_train_arguments(parser)
    args = parser.parse_args(argv)
    config = read_options(WorldConfig, args.config, args.overrides)
    return config if args.output is None else dataclasses.replace(config, output_dir=args.output)


def main(argv: list[str] | None = None) -> None:
    """``python -m realign_pipeline.shapes.train_world``: the same as ``realign world train``."""
    from ..cli import main as cli_main

    cli_main(["world", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    # libgomp reads OMP_WAIT_POLICY once, when torch is imported (this module imports it), so the process restarts
    # itself with the variable set: spinning OpenMP threads on a shared CPU run 5-10x slower. `realign world train`
    # sets it before torch loads.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "realign_pipeline.shapes.train_world", *sys.argv[1:]])
    main()
