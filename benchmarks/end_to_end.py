"""Benchmark: a whole RealignDiff call against plain Stable Diffusion, as ratios.

RealignDiff runs two denoising passes plus a captioner and a grounder. With the defaults the coarse
pass stops after 30% of the steps (``coarse_stop_fraction=0.3``), its image is the decoded x0
prediction, the layout comes from the phrase captioner and the attention grounder (masks from the
cross-attention maps recorded so far), and the prompt is encoded once for both passes. Rows:

    plain SD           ``StableDiffusionPipeline`` built from the same components
    RealignDiff        default call: early-stopped coarse pass + attention grounder + fine pass
    full coarse pass   the same with ``coarse_stop_fraction=1.0`` (the paper's two full passes)
    user regions       the fine pass alone (``regions=`` given, no coarse pass)

Models: the toy pipeline (``realign_pipeline.toy_pipeline``, 64 px) and an SD-1.5-sized pipeline
built from configs with random weights: SD 1.5's UNet (860 M) and VAE (84 M), a CLIP ViT-L/14-sized
text encoder (123 M), and the toy CLIP tokenizer (SD's vocabulary is not available offline, so the
text encoder's embedding table is the toy tokenizer's size). DDIM, CFG 7.5, batch 1.

    python benchmarks/end_to_end.py                         # toy + SD-sized, 50 steps, 256 px
    python benchmarks/end_to_end.py --models toy --repeats 5
    python benchmarks/end_to_end.py --models sd --steps 50 --size 256 --json end_to_end.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from realign_pipeline import RealignDiffPipeline  # noqa: E402
from realign_pipeline.toy_pipeline import save_toy_pipeline, write_clip_tokenizer_files  # noqa: E402

PROMPT = "a red book and a yellow vase"
TARGET = 1.35  # the bound for the default call, as a ratio to plain SD

# Stable Diffusion 1.5's UNet and VAE configs (runwayml/stable-diffusion-v1-5) and CLIP ViT-L/14's text tower.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_L_TEXT: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def sd_sized_pipeline(folder: Path, seed: int = 0) -> RealignDiffPipeline:
    """SD 1.5-sized components with random weights and the toy tokenizer (see the module docstring)."""
    write_clip_tokenizer_files(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **CLIP_L_TEXT,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return RealignDiffPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def user_regions(size: int) -> list[tuple[str, np.ndarray]]:
    left = np.zeros((size, size), dtype=np.float32)
    left[size // 4 : size * 7 // 8, : size // 2] = 1.0
    right = np.zeros((size, size), dtype=np.float32)
    right[size // 3 : size * 5 // 6, size * 9 // 16 :] = 1.0
    return [("a red book", left), ("a yellow vase", right)]


class UNetCallCounter:
    """Counts UNet forwards (a forward hook, removed on exit): the ratios' expected part."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.calls = 0

    def __enter__(self) -> UNetCallCounter:
        self.handle = self.unet.register_forward_hook(self._count)
        return self

    def _count(self, *args: object) -> None:
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def run_variants(
    pipe: RealignDiffPipeline, size: int, steps: int, repeats: int, attention: str | None
) -> dict[str, dict[str, Any]]:
    """Round-robin timings of the four calls (order rotated each round)."""
    plain = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    for pipeline in (pipe, plain):
        pipeline.set_progress_bar_config(disable=True)
    extra = {} if attention is None else {"attention_implementation": attention}
    common = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="np")
    calls = {
        "plain SD": lambda: plain(**common, generator=torch.Generator().manual_seed(0)),
        "RealignDiff (default: stop at 0.3)": lambda: pipe(
            **common, coarse_stop_fraction=0.3, generator=torch.Generator().manual_seed(0), **extra
        ),
        "full coarse pass": lambda: pipe(
            **common, coarse_stop_fraction=1.0, generator=torch.Generator().manual_seed(0), **extra
        ),
        "user regions (fine pass only)": lambda: pipe(
            **common, regions=user_regions(size), generator=torch.Generator().manual_seed(0), **extra
        ),
    }
    names = list(calls)
    results: dict[str, dict[str, Any]] = {name: {"wall_s": [], "cpu_s": []} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with UNetCallCounter(pipe.unet) as counter:
                start, start_cpu = time.perf_counter(), time.process_time()
                calls[name]()
                wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            results[name]["wall_s"].append(wall)
            results[name]["cpu_s"].append(cpu)
            results[name]["unet_calls"] = counter.calls
            print(
                f"  round {round_index + 1}/{repeats} {name:36s} wall {wall:8.2f} s  cpu {cpu:8.2f} s  "
                f"{counter.calls} UNet calls",
                flush=True,
            )
    for metric in ("wall", "cpu"):
        base = results["plain SD"][f"{metric}_s"]
        for name in names:
            values = results[name][f"{metric}_s"]
            ratios = [value / floor for value, floor in zip(values, base)]
            results[name][metric] = {
                "median_s": statistics.median(values),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
    return results


def print_table(model: str, results: dict[str, dict[str, Any]]) -> None:
    rows = [["call", "wall s", "× plain SD, wall", "CPU s", "× plain SD, CPU", "UNet calls", "target (wall, CPU)"]]
    for name, entry in results.items():
        target = ""
        if name.startswith("RealignDiff"):
            verdicts = ["ok" if entry[metric]["ratio"] <= TARGET else "MISSED" for metric in ("wall", "cpu")]
            target = f"≤ {TARGET:.2f}: {verdicts[0]}, {verdicts[1]}"
        row = [name]
        for metric in ("wall", "cpu"):
            stats = entry[metric]
            row += [
                f"{stats['median_s']:.2f}",
                f"{stats['ratio']:.3f} [{stats['ratio_min']:.3f}, {stats['ratio_max']:.3f}]",
            ]
        rows.append(row + [str(entry["unet_calls"]), target])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print(f"\n{model}\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy", "sd"], choices=["toy", "sd"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="image size of the SD-sized model (toy: 64)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 5 toy, 1 SD-sized)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 for the toy model, torch's for SD)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    # The attention implementation is named where the pipeline offers the choice (fast is its default).
    offers_choice = "attention_implementation" in inspect.signature(RealignDiffPipeline.__call__).parameters
    attention = "fast" if offers_choice else None
    report: dict[str, Any] = {
        "steps": args.steps,
        "attention_implementation": attention or "pipeline default",
        "load_average_before": os.getloadavg(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            # The toy UNet's ops are too small to gain from threads, and on a shared machine a
            # multi-threaded tiny op mostly waits for its slowest thread.
            torch.set_num_threads(args.threads or (1 if model == "toy" else default_threads))
            if model == "toy":
                pipe, size, repeats = RealignDiffPipeline.from_pretrained(save_toy_pipeline(folder)), 64, 5
            else:
                pipe, size, repeats = sd_sized_pipeline(Path(folder)), args.size, 1
            repeats = args.repeats or repeats
            print(f"{model}: {size} px, {args.steps} steps, {repeats} round(s), {torch.get_num_threads()} threads")
            results = run_variants(pipe, size, args.steps, repeats, attention)
            report["models"][model] = {
                "size": size,
                "repeats": repeats,
                "threads": torch.get_num_threads(),
                "results": results,
            }
            print_table(f"{model} ({size} px, {args.steps} steps)", results)
            del pipe
    report["load_average_after"] = os.getloadavg()
    print(f"attention: {report['attention_implementation']}; load before/after", end=" ")
    print(report["load_average_before"], report["load_average_after"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
