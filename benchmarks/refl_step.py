"""Seconds and peak memory of one ReFL step on an SD-1.5-sized UNet, with and without gradient checkpointing.

Setting (issue 5): UNet2DConditionModel with Stable Diffusion 1.5's configuration and random weights,
LoRA rank 4 on the attention projections, the differentiable caption reward (concept matching) of a
BLIP-base-sized captioner with random weights, 256 px images, CFG 7.5, batch 1, on this CPU.

A ReFL step is the no-gradient reverse process down to step t, then one UNet call with gradient,
x0, VAE decode, reward, backward and the optimizer step. Checkpointing changes only the second part,
so the script times a few no-gradient calls and the gradient part apart, and reports a full step at
ReFL's average t (34.5 no-gradient calls: t uniform over steps [30, 40) of 40) as
``34.5 × no-grad call + gradient part``. Peak RSS comes from a fresh subprocess per variant (one
gradient step each); times from one more subprocess that alternates the variants (plain,
checkpointing, plain, ...) so that a change in the machine's load hits both alike.

    nice -n 5 python benchmarks/refl_step.py             # all three runs, then the table with ratios
    python benchmarks/refl_step.py --measure memory-plain  # one run, JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ holds the toy BLIP builder
MEAN_NO_GRAD_CALLS = 34.5  # ReFL: t uniform over step indices [30, 40) of 40


def current_rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_components(resolution: int, folder: str):
    """SD 1.5's UNet, VAE and text encoder shapes with random weights (no download, nothing saved)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from realign_pipeline.toy_pipeline import write_clip_tokenizer_files
    from realign_pipeline.training.common import Components

    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return Components(tokenizer, text_encoder, vae, unet, scheduler, DDPMScheduler.from_config(scheduler.config))


def set_checkpointing(components, enabled: bool) -> None:
    for module in (components.unet, components.vae):
        module.enable_gradient_checkpointing() if enabled else module.disable_gradient_checkpointing()


def setup(resolution: int):
    """Components with LoRA, the reward, an optimizer, and a ReFL config taking the gradient at step 0
    (the no-gradient calls before it are timed apart: they do not depend on checkpointing)."""
    import torch
    from tests.rewards.toy_captioner import build_toy_blip

    from realign_pipeline.rewards import ConceptMatchingReward
    from realign_pipeline.training import TrainConfig
    from realign_pipeline.training.common import add_lora

    torch.set_num_threads(os.cpu_count() or 1)
    config = TrainConfig(
        pretrained_model="(random SD 1.5 shapes)",
        resolution=resolution,
        num_inference_steps=40,
        refl_step_range=[0, 1],
        guidance_scale=7.5,
        use_lora=True,
        lora_rank=4,
    )
    with tempfile.TemporaryDirectory() as folder:
        components = build_components(resolution, folder)
        blip, processor = build_toy_blip(
            folder, image_size=384, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
        )
    reward = ConceptMatchingReward(blip, processor.tokenizer, image_size=384)
    add_lora(components.unet, config)
    components.unet.train()
    parameters = [p for p in components.unet.parameters() if p.requires_grad]
    return config, components, reward, torch.optim.AdamW(parameters, lr=1e-5), parameters


def gradient_part(config, components, reward, optimizer, step: int) -> float:
    """Seconds for the part of a ReFL step that checkpointing changes: the UNet call with gradient,
    x0, VAE decode, reward, backward and the optimizer step."""

    from realign_pipeline.training import refl_loss, step_generator

    start = time.perf_counter()
    loss, _, _ = refl_loss(config, components, reward, ["a red book and a yellow vase"], step_generator(0, step))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def measure_memory(gradient_checkpointing: bool, resolution: int) -> dict:
    """Peak RSS of one ReFL gradient step in this (fresh) process."""
    config, components, reward, optimizer, parameters = setup(resolution)
    set_checkpointing(components, gradient_checkpointing)
    loaded = current_rss_gib()
    seconds = gradient_part(config, components, reward, optimizer, 0)
    return {
        "gradient_checkpointing": gradient_checkpointing,
        "unet_parameters_millions": sum(p.numel() for p in components.unet.parameters()) / 1e6,
        "lora_parameters": sum(p.numel() for p in parameters),
        "rss_after_loading_gib": loaded,
        "peak_rss_gib": peak_rss_gib(),
        "peak_above_loaded_gib": peak_rss_gib() - loaded,
        "single_step_s": seconds,
    }


def measure_time(resolution: int, rounds: int, no_grad_calls: int) -> dict:
    """No-gradient UNet call time, then gradient parts alternating plain / checkpointing in one process
    (a load change on the machine then hits both alike); the fastest of each is reported."""
    import torch

    from realign_pipeline.training import step_generator
    from realign_pipeline.training.common import denoise, encode_prompts, initial_latents

    config, components, reward, optimizer, _ = setup(resolution)
    sampler = components.sampler
    sampler.set_timesteps(40)
    generator = step_generator(0)
    device = torch.device("cpu")
    latents = initial_latents(components, 1, resolution, generator, device)
    cond = encode_prompts(components, ["a red book and a yellow vase"], device)
    uncond = encode_prompts(components, [""], device)
    start = time.perf_counter()
    denoise(components.unet, sampler, latents, cond, uncond, 7.5, range(no_grad_calls), generator)
    no_grad_call = (time.perf_counter() - start) / no_grad_calls
    times: dict[str, list[float]] = {"plain": [], "checkpointing": []}
    for step in range(rounds):
        for variant in ("plain", "checkpointing"):
            set_checkpointing(components, variant == "checkpointing")
            times[variant].append(gradient_part(config, components, reward, optimizer, step))
    return {"threads": torch.get_num_threads(), "no_grad_unet_call_s": no_grad_call, "gradient_part_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--measure", choices=["memory-plain", "memory-checkpointing", "time"], help="one part, JSON out"
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="gradient steps per variant in the timing run")
    parser.add_argument("--no-grad-calls", type=int, default=2, help="no-gradient UNet calls timed")
    args = parser.parse_args()
    if args.measure == "time":
        result = measure_time(args.resolution, args.rounds, args.no_grad_calls)
    elif args.measure:
        result = measure_memory(args.measure == "memory-checkpointing", args.resolution)
    if args.measure:
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for part in ("memory-plain", "memory-checkpointing", "time"):
        command = [sys.executable, __file__, "--measure", part, "--resolution", str(args.resolution)]
        command += ["--rounds", str(args.rounds), "--no-grad-calls", str(args.no_grad_calls)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
        results[part] = json.loads(line[len("RESULT ") :])
        print(f"{part}: {json.dumps(results[part])}", flush=True)

    timing = results["time"]
    call = timing["no_grad_unet_call_s"]
    grad = {variant: min(values) for variant, values in timing["gradient_part_s"].items()}
    full = {variant: MEAN_NO_GRAD_CALLS * call + grad[variant] for variant in grad}
    memory = {"plain": results["memory-plain"], "checkpointing": results["memory-checkpointing"]}
    print()
    print(
        f"ReFL step, SD-1.5-sized UNet ({memory['plain']['unet_parameters_millions']:.0f} M, random), LoRA rank 4, "
        f"{args.resolution} px, CFG 7.5, batch 1, BLIP-base-sized concept-matching reward, "
        f"CPU ({timing['threads']} threads)"
    )
    print(f"{'':34}{'plain':>10}{'checkpointing':>15}{'ratio':>8}")
    rows = [
        ("gradient part (s, fastest)", grad["plain"], grad["checkpointing"]),
        (f"full step, {MEAN_NO_GRAD_CALLS} no-grad calls (s)", full["plain"], full["checkpointing"]),
        ("peak RSS (GiB)", memory["plain"]["peak_rss_gib"], memory["checkpointing"]["peak_rss_gib"]),
        (
            "peak RSS above loaded (GiB)",
            memory["plain"]["peak_above_loaded_gib"],
            memory["checkpointing"]["peak_above_loaded_gib"],
        ),
    ]
    for label, plain, checkpointing in rows:
        print(f"{label:34}{plain:>10.2f}{checkpointing:>15.2f}{checkpointing / plain:>8.2f}")
    print(f"no-gradient CFG UNet call: {call:.2f} s (the same in both variants)")


if __name__ == "__main__":
    main()
