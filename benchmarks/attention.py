"""Benchmark: the cost of RealignDiff's re-weighted attention in an SD-1.5-sized UNet.

One UNet step (CFG batch 2: unconditional + conditional, the conditional half modulated) of
``UNet2DConditionModel`` built from Stable Diffusion 1.5's real config with random weights
(860 M parameters), for these variants:

    floor        diffusers' ``AttnProcessor2_0`` on every layer (plain fused SDPA)
    reference    ``RealignAttnProcessor`` with the materialised re-weighting (DenseDiffusion-style)
    fast         ``RealignAttnProcessor`` with ``reweighted_attention_fast`` (rank-R bias in SDPA)
    fast_full    the same, on a layout whose regions cover every pixel (no unmodulated rows to skip)
    no_layout    ``RealignAttnProcessor`` with the fast function and a state with no regions

Every modulated variant re-weights every step (the worst case). "default window" is a whole
denoising run in which the first 30% of the steps are modulated and the rest take the processor's
plain path, derived from the measured step times: ``(0.3·fast + 0.7·no_layout) / floor``.

Step times are measured round-robin (every variant once per round, order rotated), so load
changes on a shared machine hit all variants alike; ratios are per-round paired ratios to the
floor, reported as median [min, max], for wall-clock and for the process's CPU time. On a machine
shared with other jobs, wall-clock with several threads mostly measures the neighbours (every
multi-threaded op waits for its slowest thread); CPU time with ``--threads 1`` is the reproducible
cost. Peak memory is measured in a fresh process per variant:
peak RSS on the CPU (the whole process, weights included, and the step's own rise above the RSS
before it), ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/attention.py                       # 256 and 512 px, 5 rounds, CPU fp32
    python benchmarks/attention.py --threads 1           # the same, robust to other jobs on the machine
    python benchmarks/attention.py --sizes 256 --repeats 5 --json attention.json
    python benchmarks/attention.py --device cuda --dtype float16 --sizes 512 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from realign_pipeline.pipeline_realign_diff import (  # noqa: E402
    AttentionModulationState,
    RealignAttnProcessor,
    RegionTensors,
    realign_processors_installed,
    reweighted_attention_fast,  # noqa: E402
    reweighted_attention_reference,
)

# Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

VARIANTS = ("floor", "reference", "fast", "fast_full", "no_layout")
TARGETS = {
    # (variant, size): the bound on the ratio to the floor, every step modulated.
    ("fast", 256): 1.10,
    ("fast", 512): 1.25,
    ("no_layout", None): 1.02,
    ("window", None): 1.05,
}
NUM_TOKENS = 77
# A step early in DenseDiffusion's window: c(t) = (901/1000)^5 ≈ 0.59. The cost does not depend on it.
TIMESTEP = 901


def build_unet(device: str, dtype: torch.dtype, seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's UNet with diffusers' default random initialisation."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval().to(device)
    return unet if dtype == torch.float32 else unet.to(dtype)


def benchmark_layout(size: int, full_cover: bool) -> RegionTensors:
    """A three-object layout at image resolution, or four quadrants covering every pixel.

    The three objects ("a red book", "a yellow vase" and a cup overlapping the book) cover about
    45% of the image, like a typical two-or-three-object T2I-CompBench prompt; the rest of the
    pixels are in no region and are not modulated.
    """
    labels = torch.full((1, size, size), -1, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if full_cover:
        labels[0] = (ys >= size // 2).long() * 2 + (xs >= size // 2).long()
        token_groups = [[2, 3], [6, 7], [10, 11], [14]]
    else:
        book = (ys >= size * 0.35) & (ys < size * 0.85) & (xs >= size * 0.05) & (xs < size * 0.5)
        vase = (ys - size * 0.55) ** 2 + (xs - size * 0.75) ** 2 < (size * 0.2) ** 2
        cup = (ys >= size * 0.25) & (ys < size * 0.45) & (xs >= size * 0.2) & (xs < size * 0.4)
        labels[0][book] = 0
        labels[0][vase] = 1
        labels[0][cup] = 2  # the smaller mask wins the overlap, as partition_masks decides
        token_groups = [[2, 3], [6, 7], [10]]
    region_tokens = torch.zeros(1, len(token_groups), NUM_TOKENS, dtype=torch.bool)
    for index, tokens in enumerate(token_groups):
        region_tokens[0, index, tokens] = True
    return RegionTensors(labels=labels, region_tokens=region_tokens)


def variant_setup(variant: str, size: int) -> tuple[RealignAttnProcessor | None, AttentionModulationState | None]:
    """The processor (``None``: ``AttnProcessor2_0``) and the per-call state of a variant."""
    if variant == "floor":
        return None, None
    latent = size // 8
    function = reweighted_attention_reference if variant == "reference" else reweighted_attention_fast
    regions = None if variant == "no_layout" else benchmark_layout(size, full_cover=variant == "fast_full")
    state = AttentionModulationState(
        latent_size=(latent, latent), regions=regions, timestep=TIMESTEP, modulate=True, conditional_half_only=True
    )
    return RealignAttnProcessor(attention_function=function), state


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unet_step(
    unet: UNet2DConditionModel,
    variant: str,
    size: int,
    device: str,
    dtype: torch.dtype,
    generator_seed: int = 0,
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one UNet forward of a CFG batch of 2 under ``variant``."""
    generator = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    text = torch.randn(2, NUM_TOKENS, SD15_CONFIG["cross_attention_dim"], generator=generator).to(device, dtype)
    processor, state = variant_setup(variant, size)
    kwargs = {} if state is None else {"cross_attention_kwargs": {"realign_state": state}}
    unet.set_attn_processor(AttnProcessor2_0())
    installed = realign_processors_installed(unet, processor) if processor else contextlib.nullcontext()
    with torch.no_grad(), installed:
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        unet(latents, TIMESTEP, encoder_hidden_states=text, **kwargs)
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - start_cpu


# -- memory, in a fresh process per variant --------------------------------------------------------


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_worker(variant: str, size: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Peak memory of one step of ``variant`` in this (fresh) process, in MiB."""
    unet = build_unet(device, dtype)
    # Thread pools, oneDNN and CUDA kernels, allocator arenas: set up on a tiny input, outside the peak.
    unet_step(unet, variant, 64, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        unet_step(unet, variant, size, device, dtype)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": peak / 2**20, "step_rise_mib": (peak - before) / 2**20}
    before = _read_status_kib("VmRSS")
    try:
        # "5" resets the peak-RSS counter (VmHWM), so the peak below is the step's own.
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    unet_step(unet, variant, size, device, dtype)
    peak_kib = _read_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak_kib / 1024, "step_rise_mib": (peak_kib - before) / 1024, "hwm_reset": reset}


def measure_memory(variants: list[str], size: int, device: str, dtype_name: str) -> dict[str, dict[str, float]]:
    results = {}
    for variant in variants:
        command = [
            sys.executable,
            __file__,
            "--memory-worker",
            variant,
            "--sizes",
            str(size),
            "--device",
            device,
            "--dtype",
            dtype_name,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"memory worker for {variant} at {size} px failed:\n{completed.stderr[-4000:]}")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"  memory {size}px {variant:10s} peak {results[variant]['peak_mib']:8.0f} MiB", flush=True)
    return results


# -- timing ----------------------------------------------------------------------------------------


def measure_times(
    unet: UNet2DConditionModel, variants: list[str], size: int, repeats: int, device: str, dtype: torch.dtype
) -> dict[str, dict[str, list[float]]]:
    """Round-robin step times, ``{"wall" | "cpu": {variant: [seconds per round]}}``.

    The order rotates every round so no variant always follows another. CPU time (all threads of
    this process) is what a step costs whatever else the machine runs; on a shared machine wall-clock
    also measures the other tenants, and more so for many small multi-threaded ops than for few
    large ones.
    """
    unet_step(unet, "floor", size, device, dtype)  # warm-up: allocator, oneDNN primitives, kernels
    times: dict[str, dict[str, list[float]]] = {"wall": {v: [] for v in variants}, "cpu": {v: [] for v in variants}}
    for round_index in range(repeats):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            wall, cpu = unet_step(unet, variant, size, device, dtype)
            times["wall"][variant].append(wall)
            times["cpu"][variant].append(cpu)
            print(
                f"  round {round_index + 1}/{repeats} {size}px {variant:10s} wall {wall:8.3f} s  cpu {cpu:8.3f} s",
                flush=True,
            )
    return times


def summarise(times: dict[str, list[float]], window: float) -> dict[str, dict[str, float]]:
    """Median and spread of the times, and of per-round ratios to the floor."""
    floor = times["floor"]
    summary: dict[str, dict[str, float]] = {}
    for variant, values in times.items():
        ratios = [value / base for value, base in zip(values, floor)]
        summary[variant] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    if "fast" in times and "no_layout" in times:
        ratios = [
            (window * fast + (1 - window) * plain) / base
            for fast, plain, base in zip(times["fast"], times["no_layout"], floor)
        ]
        summary["window"] = {
            "median_s": window * summary["fast"]["median_s"] + (1 - window) * summary["no_layout"]["median_s"],
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return summary


def target_for(variant: str, size: int) -> float | None:
    return TARGETS.get((variant, size), TARGETS.get((variant, None)))


def table_rows(results: dict[str, Any], window: float) -> list[list[str]]:
    """One row per (size, variant): times and ratios to the floor (wall and CPU), targets, peak memory."""
    labels = {
        "floor": "floor (AttnProcessor2_0)",
        "reference": "reference re-weighting",
        "fast": "fast re-weighting",
        "fast_full": "fast, every pixel in a region",
        "no_layout": "fast processor, no layout",
        "window": f"default window ({window:.0%} of steps)",
    }
    rows = [
        [
            "variant",
            "px",
            "wall s",
            "× floor, wall",
            "CPU s",
            "× floor, CPU",
            "target (wall, CPU)",
            "peak MiB",
            "step rise MiB",
        ]
    ]

    def ratio_cell(stats: dict[str, float]) -> str:
        return f"{stats['ratio']:.3f} [{stats['ratio_min']:.3f}, {stats['ratio_max']:.3f}]"

    def verdict(stats: dict[str, float] | None, target: float) -> str:
        return "—" if stats is None else ("ok" if stats["ratio"] <= target else "MISSED")

    for size, entry in results["sizes"].items():
        wall_summary, cpu_summary = entry["summary"]["wall"], entry["summary"].get("cpu", {})
        for variant, wall in wall_summary.items():
            cpu = cpu_summary.get(variant)
            target = target_for(variant, int(size))
            memory = entry.get("memory", {}).get(variant, {})
            rows.append(
                [
                    labels[variant],
                    size,
                    f"{wall['median_s']:.2f}",
                    ratio_cell(wall),
                    "" if cpu is None else f"{cpu['median_s']:.2f}",
                    "" if cpu is None else ratio_cell(cpu),
                    "" if target is None else f"≤ {target:.2f}: {verdict(wall, target)}, {verdict(cpu, target)}",
                    f"{memory['peak_mib']:.0f}" if memory else "",
                    f"{memory['step_rise_mib']:.0f}" if memory else "",
                ]
            )
    return rows


def print_table(rows: list[list[str]]) -> None:
    """A Markdown table, so it can be pasted into the README as it is."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print("\n" + "\n".join(lines) + "\n")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (every variant once per round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 / bfloat16 (GPU default fp16)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--window", type=float, default=0.3, help="fraction of a run's steps that are modulated")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.sizes[0], args.device, dtype)))
        return

    variants = ["floor"] + [v for v in args.variants if v != "floor"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "window": args.window,
        "load_average_before": os.getloadavg(),
        "sizes": {},
    }
    # Memory first, each in its own process, before this process holds a 3.4 GB UNet of its own.
    if not args.no_memory:
        for size in args.sizes:
            results["sizes"].setdefault(str(size), {})["memory"] = measure_memory(
                variants, size, args.device, dtype_name
            )
    unet = build_unet(args.device, dtype)
    for size in args.sizes:
        times = measure_times(unet, variants, size, args.repeats, args.device, dtype)
        entry = results["sizes"].setdefault(str(size), {})
        if args.device.startswith("cuda"):
            del times["cpu"]  # host time says nothing about the GPU
        entry["times_s"] = times
        entry["summary"] = {metric: summarise(values, args.window) for metric, values in times.items()}
    results["load_average_after"] = os.getloadavg()
    print_table(table_rows(results, args.window))
    print(f"{results['device']}, {dtype_name}, {results['threads']} threads, load before/after:", end=" ")
    print(results["load_average_before"], results["load_average_after"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
