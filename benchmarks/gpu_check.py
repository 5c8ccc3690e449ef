"""One short GPU check of RealignDiff (issue [K] item 4): fp16, 512 px, eager and compiled, time and peak memory.

Run on a machine with a CUDA device (no Hub needed: the SD-1.5-sized pipeline is built from configs with random
weights, as in ``end_to_end.py``), about 3-5 minutes including two ``torch.compile`` builds:

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --mode max-autotune-no-cudagraphs      # longer: autotunes every GEMM
    python benchmarks/gpu_check.py --device cpu --tiny --backend eager   # smoke test on the toy model (CPU)

Rows, every one a ratio to its plain counterpart measured in the same run (peak memory from
``torch.cuda.max_memory_allocated``, reset before each row; flash and memory-efficient SDPA kernels allowed):

    step, eager           one UNet forward, CFG batch 2: AttnProcessor2_0 vs RealignAttnProcessor re-weighting
    step, compiled        the same under ``torch.compile(unet)`` (the compile time of each reported too)
    call, eager           whole calls: plain ``StableDiffusionPipeline`` vs RealignDiff with user regions
                          (the fine pass, re-weighting the first 30% of the steps) and the default call
                          (coarse pass stopped at 30%, attention masks, fine pass)
    call, compiled        plain SD and RealignDiff with user regions with ``pipe.unet = torch.compile(pipe.unet)``

Goals from the issue: re-weighted step ≤ 1.05× plain and peak memory ≤ +5%. The layout is ``attention.py``'s
three objects (about 45% of the image). Results are written to ``--json`` after every phase, so a run stopped
by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import benchmark_layout, cpu_name  # noqa: E402
from end_to_end import sd_sized_pipeline  # noqa: E402

from realign_pipeline import RealignDiffPipeline  # noqa: E402
from realign_pipeline.pipeline_realign_diff import (  # noqa: E402
    AttentionModulationState,
    RealignAttnProcessor,
    reweighted_attention_fast,
)
from realign_pipeline.toy_pipeline import save_toy_pipeline  # noqa: E402

PROMPT = "a red book and a yellow vase and a cup"
CAPTIONS = ("a red book", "a yellow vase", "a cup")  # the three regions of attention.benchmark_layout, in order
STEP_GOAL, MEMORY_GOAL = 1.05, 1.05


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, function: Callable[[], Any]) -> tuple[float, float | None]:
    """Wall-clock seconds and peak allocated MiB (CUDA only) of one call of ``function``."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        function()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return seconds, peak


def median_of(device: str, function: Callable[[], Any], repeats: int) -> dict[str, Any]:
    runs = [measured(device, function) for _ in range(repeats)]
    peaks = [peak for _, peak in runs if peak is not None]
    return {"median_s": statistics.median(s for s, _ in runs), "peak_mib": max(peaks) if peaks else None}


def build(args: argparse.Namespace, folder: Path) -> RealignDiffPipeline:
    if args.tiny:
        pipe = RealignDiffPipeline.from_pretrained(save_toy_pipeline(folder, sample_size=args.size // 4))
    else:
        pipe = sd_sized_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device, getattr(torch, args.dtype))


class Rows:
    """The measurements, with the pipeline, the layout and one processor object of each kind (a new processor
    object would fail a compiled graph's guards and compile again)."""

    def __init__(self, pipe: RealignDiffPipeline, args: argparse.Namespace) -> None:
        self.pipe, self.args, self.device = pipe, args, args.device
        self.plain_pipe = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"})
        self.plain_pipe.set_progress_bar_config(disable=True)
        self.plain_processor, self.realign_processor = AttnProcessor2_0(), RealignAttnProcessor()
        dtype, size = getattr(torch, args.dtype), args.size
        self.latent_size = (size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(2, 4, *self.latent_size, generator=generator).to(args.device, dtype)
        cross_dim = pipe.unet.config.cross_attention_dim
        self.text = torch.randn(2, 77, cross_dim, generator=generator).to(args.device, dtype)
        self.layout = benchmark_layout(size, full_cover=False)
        self.regions = [(caption, (self.layout.labels[0] == r).numpy()) for r, caption in enumerate(CAPTIONS)]
        self.unet = pipe.unet

    def use(self, realign: bool) -> None:
        self.unet.set_attn_processor(self.realign_processor if realign else self.plain_processor)

    def step(self, unet: torch.nn.Module, realign: bool) -> Callable[[], Any]:
        state = AttentionModulationState(
            latent_size=self.latent_size,
            regions=self.layout,
            timestep=torch.tensor(901.0),
            modulate=torch.tensor(True),
            attention_function=reweighted_attention_fast,  # as the pipeline sets it: the same compiled graph
        )
        attention_kwargs = {"realign_state": state} if realign else None
        timestep = torch.tensor(901, device=self.device)

        def run() -> None:
            self.use(realign)
            # The same arguments as the pipelines' loops pass (dynamo guards on them): the calls reuse these graphs.
            unet(
                self.latents,
                timestep,
                encoder_hidden_states=self.text,
                timestep_cond=None,
                cross_attention_kwargs=attention_kwargs,
                added_cond_kwargs=None,
                return_dict=False,
            )

        return run

    def call(self, kind: str) -> Callable[[], Any]:
        common = dict(prompt=PROMPT, height=self.args.size, width=self.args.size, output_type="latent")
        common["num_inference_steps"] = self.args.steps

        def run() -> None:
            generator = torch.Generator(self.device).manual_seed(0)
            self.use(kind != "plain SD")
            if kind == "plain SD":
                self.plain_pipe(**common, generator=generator)
            elif kind == "RealignDiff, user regions":
                self.pipe(**common, regions=self.regions, generator=generator)
            else:
                self.pipe(**common, generator=generator)

        return run


def ratio_rows(entry: dict[str, dict[str, Any]], base: str) -> None:
    """Add × plain time and memory to every row of ``entry`` against its row ``base``."""
    for stats in entry.values():
        stats["x_time"] = stats["median_s"] / entry[base]["median_s"]
        if stats["peak_mib"] is not None:
            stats["x_memory"] = stats["peak_mib"] / entry[base]["peak_mib"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on the CPU")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the whole calls")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per step row (calls: 1 after warm-up)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--tiny", action="store_true", help="the toy model instead of the SD-1.5-sized one")
    parser.add_argument("--json", type=Path, default=None, help="write every number here (after every phase)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke test)")
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "model": "toy" if args.tiny else "SD-1.5-sized, random weights",
        "torch": torch.__version__,
        "mode": args.mode,
        "backend": args.backend,
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "rows": {},
    }

    def save(phase: str, entry: dict[str, Any]) -> None:
        report["rows"][phase] = entry
        print(f"{phase}: {json.dumps(entry, indent=1)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as folder:
        rows = Rows(build(args, Path(folder)), args)
        unet = rows.unet
        steps = {"plain": rows.step(unet, False), "re-weighted": rows.step(unet, True)}
        for run in steps.values():
            measured(args.device, run)  # warm-up: kernels, allocator
        entry = {name: median_of(args.device, run, args.repeats) for name, run in steps.items()}
        ratio_rows(entry, "plain")
        save("step, eager", entry)

        calls = {kind: rows.call(kind) for kind in ("plain SD", "RealignDiff, user regions", "RealignDiff, default")}
        measured(args.device, calls["RealignDiff, user regions"])  # warm-up
        entry = {kind: median_of(args.device, run, 1) for kind, run in calls.items()}
        ratio_rows(entry, "plain SD")
        save("call, eager", entry)
        if args.no_compile:
            return report

        compiled = torch.compile(unet, mode=args.mode, backend=args.backend, dynamic=False)
        entry, compile_s = {}, {}
        for name, realign in (("plain", False), ("re-weighted", True)):
            run = rows.step(compiled, realign)
            graphs = counters["stats"]["unique_graphs"]
            first, _ = measured(args.device, run)
            entry[name] = median_of(args.device, run, args.repeats)
            compile_s[name] = first - entry[name]["median_s"]
            entry[name]["compile_s"] = compile_s[name]
            entry[name]["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
        entry["graph_breaks"] = {"total": sum(counters["graph_break"].values())}
        ratio_rows({k: v for k, v in entry.items() if k != "graph_breaks"}, "plain")
        save("step, compiled", entry)

        rows.pipe.unet = compiled  # the plain pipeline shares the components, so both calls run compiled
        rows.plain_pipe.unet = compiled
        graphs = counters["stats"]["unique_graphs"]
        entry = {kind: median_of(args.device, calls[kind], 1) for kind in ("plain SD", "RealignDiff, user regions")}
        ratio_rows(entry, "plain SD")
        entry["graphs_compiled_by_the_calls"] = {"total": counters["stats"]["unique_graphs"] - graphs}
        save("call, compiled", entry)
    return report


if __name__ == "__main__":
    main()
