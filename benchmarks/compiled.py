"""Benchmark: RealignDiff's re-weighted step under ``torch.compile``, as ratios to the compiled plain step.

One UNet forward of ``UNet2DConditionModel`` built from Stable Diffusion 1.5's config with random weights (see
``attention.py``), CFG batch 2 with the conditional half re-weighted on the three-object layout of
``attention.py``, for these rows (all in one process, the same UNet, round-robin so load hits all alike):

    eager plain          diffusers' ``AttnProcessor2_0``, not compiled (what ``attention.py`` calls the floor)
    compiled plain       ``torch.compile(unet)`` with ``AttnProcessor2_0``
    compiled re-weighted ``torch.compile(unet)`` with ``RealignAttnProcessor``, a step with ``modulate`` on
    compiled, switch off the same compiled graph on a step with ``modulate`` off (the run's later steps)

``timestep`` and ``modulate`` are 0-d tensors, as the pipeline's loop sets them, so both re-weighted rows run one
graph; the script counts dynamo's graphs and graph breaks and fails if a timed step compiled anything. "compile s"
is the first call's wall-clock minus a steady step's: dynamo's tracing plus inductor's code generation and C++
builds (``TORCHINDUCTOR_FX_GRAPH_CACHE`` can make a second run's much shorter: the script turns the caches off so
it measures a cold compile). Ratios are per-round paired ratios to the compiled plain step, median [min, max].

    python benchmarks/compiled.py --threads 1                     # 256 and 512 px, 3 rounds, CPU fp32
    python benchmarks/compiled.py --sizes 256 --repeats 2 --json compiled.json
    python benchmarks/compiled.py --device cuda --dtype float16 --mode max-autotune-no-cudagraphs --sizes 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._inductor.config  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import NUM_TOKENS, SD15_CONFIG, TIMESTEP, benchmark_layout, build_unet, cpu_name  # noqa: E402

from realign_pipeline.pipeline_realign_diff import AttentionModulationState, RealignAttnProcessor  # noqa: E402

ROWS = ("eager plain", "compiled plain", "compiled re-weighted", "compiled, switch off")
TARGET = 1.10  # the bound for compiled re-weighted / compiled plain on the CPU


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dynamo_totals() -> dict[str, int]:
    """Graphs compiled and graph breaks so far in this process (``torch._dynamo.utils.counters``)."""
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


class Steps:
    """One UNet, two processor sets, one compiled wrapper: each row sets its processors and runs one step."""

    def __init__(self, unet: torch.nn.Module, size: int, device: str, dtype: torch.dtype, mode: str | None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.unet, self.device = unet, device
        self.latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device, dtype)
        self.text = torch.randn(2, NUM_TOKENS, SD15_CONFIG["cross_attention_dim"], generator=generator).to(
            device, dtype
        )
        self.timestep = torch.tensor(TIMESTEP, device=device)
        latent = size // 8
        self.state = AttentionModulationState(
            latent_size=(latent, latent),
            regions=benchmark_layout(size, full_cover=False),
            timestep=torch.tensor(float(TIMESTEP)),
            modulate=torch.tensor(True),
        )
        self.plain_processor, self.realign_processor = AttnProcessor2_0(), RealignAttnProcessor()
        self.compiled = torch.compile(unet, mode=mode, dynamic=False)

    def run(self, row: str) -> tuple[float, float]:
        """Wall-clock and process CPU seconds of one step of ``row``."""
        realign = row in ("compiled re-weighted", "compiled, switch off")
        self.unet.set_attn_processor(self.realign_processor if realign else self.plain_processor)
        self.state.modulate = torch.tensor(row == "compiled re-weighted")
        model = self.unet if row == "eager plain" else self.compiled
        kwargs = {"cross_attention_kwargs": {"realign_state": self.state}} if realign else {}
        with torch.no_grad():
            synchronize(self.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            model(self.latents, self.timestep, encoder_hidden_states=self.text, **kwargs)
            synchronize(self.device)
            return time.perf_counter() - start, time.process_time() - start_cpu


def measure_size(
    unet: torch.nn.Module, size: int, repeats: int, device: str, dtype: torch.dtype, mode: str | None
) -> dict[str, Any]:
    steps = Steps(unet, size, device, dtype, mode)
    entry: dict[str, Any] = {"first_call_s": {}, "dynamo": {}}
    steps.run("eager plain")  # warm-up: allocator, oneDNN primitives
    for row in ("compiled plain", "compiled re-weighted"):
        before = dynamo_totals()
        wall, _ = steps.run(row)
        after = dynamo_totals()
        entry["first_call_s"][row] = wall
        entry["dynamo"][row] = {key: after[key] - before[key] for key in after}
        print(f"  {size}px first call {row:22s} {wall:8.1f} s  {entry['dynamo'][row]}", flush=True)
    compiled_so_far = dynamo_totals()
    times: dict[str, dict[str, list[float]]] = {"wall": {r: [] for r in ROWS}, "cpu": {r: [] for r in ROWS}}
    for round_index in range(repeats):
        shift = round_index % len(ROWS)
        for row in ROWS[shift:] + ROWS[:shift]:
            wall, cpu = steps.run(row)
            times["wall"][row].append(wall)
            times["cpu"][row].append(cpu)
            print(f"  round {round_index + 1}/{repeats} {size}px {row:22s} wall {wall:8.3f} s  cpu {cpu:8.3f} s")
    if dynamo_totals() != compiled_so_far:
        raise RuntimeError(f"a timed step compiled again: {compiled_so_far} -> {dynamo_totals()}")
    entry["times_s"] = times
    entry["summary"] = {}
    for metric, values in times.items():
        base = values["compiled plain"]
        entry["summary"][metric] = {}
        for row, row_values in values.items():
            ratios = [value / floor for value, floor in zip(row_values, base)]
            entry["summary"][metric][row] = {
                "median_s": statistics.median(row_values),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
    steady = entry["summary"]["wall"]
    entry["compile_s"] = {
        row: entry["first_call_s"][row] - steady[row]["median_s"] for row in ("compiled plain", "compiled re-weighted")
    }
    return entry


def print_table(results: dict[str, Any]) -> None:
    rows = [["row", "px", "wall s", "× compiled plain, wall", "CPU s", "× compiled plain, CPU", "compile s", "target"]]
    for size, entry in results["sizes"].items():
        for row in ROWS:
            wall, cpu = entry["summary"]["wall"][row], entry["summary"]["cpu"][row]
            target = ""
            if row == "compiled re-weighted":
                verdicts = ["ok" if stats["ratio"] <= TARGET else "MISSED" for stats in (wall, cpu)]
                target = f"≤ {TARGET:.2f}: {', '.join(verdicts)}"
            compile_s = entry["compile_s"].get(row)
            rows.append(
                [
                    row,
                    size,
                    f"{wall['median_s']:.2f}",
                    f"{wall['ratio']:.3f} [{wall['ratio_min']:.3f}, {wall['ratio_max']:.3f}]",
                    f"{cpu['median_s']:.2f}",
                    f"{cpu['ratio']:.3f} [{cpu['ratio_min']:.3f}, {cpu['ratio_max']:.3f}]",
                    "" if compile_s is None else f"{compile_s:.0f}",
                    target,
                ]
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print("\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (every row once per round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 / bfloat16 (GPU default fp16)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    args = parser.parse_args()
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A cold compile every time: the caches would make "compile s" depend on earlier runs.
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    torch._dynamo.config.recompile_limit = 16  # two sizes × two processor sets, each its own static graph

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
        "sizes": {},
    }
    unet = build_unet(args.device, dtype)
    for size in args.sizes:
        results["sizes"][str(size)] = measure_size(unet, size, args.repeats, args.device, dtype, args.mode)
    results["load_average_after"] = os.getloadavg()
    results["dynamo_totals"] = dynamo_totals()
    print(f"{results['device']}, {dtype_name}, torch {torch.__version__}, {results['threads']} threads")
    print(f"mode {args.mode}, dynamo {results['dynamo_totals']}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
