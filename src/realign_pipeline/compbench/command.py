"""``realign eval --benchmark t2i-compbench`` and ``accelerate launch -m realign_pipeline.compbench``.

Every process plans the same work, takes its shard (``plan.shard`` with accelerate's process index and
count), draws its missing images, then scores its missing work items; process 0 waits for all and writes
the report from every shard's score files. Run it again with the same arguments to resume.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import UsageError
from ..prompts import T2I_COMPBENCH_CATEGORIES
from .configurations import select_compbench_configurations
from .options import DEFAULT_OUTPUT, add_compbench_arguments, positive_int
from .phrases import PhraseParser, load_phrase_parser
from .plan import category_prompts, plan_work, shard
from .run import (
    MANIFEST_FILE,
    CompBenchSettings,
    check_manifest,
    generate_images,
    package_versions,
    read_scores,
    remove_partial_files,
    score_items,
    write_atomically,
)

# Options `realign eval` already has (the shapes benchmark's); the standalone parser adds them itself.
SHARED_DEFAULTS = {"steps": 50, "guidance_scale": 7.5, "seed": 0, "batch_size": 10, "coarse_stop_fraction": 0.3}


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (``python -m realign_pipeline.compbench``), T2I-CompBench's defaults."""
    parser = argparse.ArgumentParser(prog="realign-compbench", description=__doc__)
    parser.add_argument("--steps", type=positive_int, default=SHARED_DEFAULTS["steps"])
    parser.add_argument("--guidance-scale", type=float, default=SHARED_DEFAULTS["guidance_scale"])
    parser.add_argument("--seed", type=int, default=SHARED_DEFAULTS["seed"])
    parser.add_argument("--batch-size", type=positive_int, default=SHARED_DEFAULTS["batch_size"])
    parser.add_argument("--coarse-stop-fraction", type=float, default=SHARED_DEFAULTS["coarse_stop_fraction"])
    parser.add_argument("--device", default=None, help="(default: accelerate's device for this process)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"(default {DEFAULT_OUTPUT})")
    add_compbench_arguments(parser)
    parser.set_defaults(benchmark="t2i-compbench")
    return parser


def settings_from_args(args: argparse.Namespace) -> CompBenchSettings:
    """Check every argument (before any model loads) and gather the run's settings."""
    if not args.model:
        raise UsageError("--model: give a Stable Diffusion repo id or folder for --benchmark t2i-compbench")
    try:
        configurations = select_compbench_configurations(args.compbench_configurations, args.realign_unet is not None)
        prompts = category_prompts(args.categories, args.compbench_split, args.compbench_prompts)
    except ValueError as error:
        raise UsageError(f"{error}") from None
    if "complex" in prompts and args.compbench_split != "val":
        raise UsageError("--categories complex: the 3-in-1 sub-lists are packaged for --compbench-split val only")
    if not 0 < args.coarse_stop_fraction <= 1:
        raise UsageError(f"--coarse-stop-fraction must be in (0, 1], got {args.coarse_stop_fraction}")
    for name in ("box_threshold", "text_threshold"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) % 8:
            raise UsageError(f"--{name} must be a multiple of 8, got {getattr(args, name)}")
    return CompBenchSettings(
        model=str(args.model),
        categories=tuple(prompts),
        configurations=tuple(c.name for c in configurations),
        realign_unet=args.realign_unet,
        realign_unet_subfolder=args.realign_unet_subfolder or None,
        split=args.compbench_split,
        prompts_per_category=args.compbench_prompts,
        images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        batch_size=min(args.batch_size, args.images_per_prompt),
        height=args.height,
        width=args.width,
        coarse_stop_fraction=args.coarse_stop_fraction,
        dtype=args.dtype,
        phrase_parser=args.phrase_parser,
        vqa_model=args.vqa_model,
        clip_model=args.clip_model,
        detector_model=args.detector_model,
        segmenter_model=args.segmenter_model,
        box_threshold=args.box_threshold,
        text_threshold=args.text_threshold,
    )


class ScorerCache:
    """The category scorers, each model loaded on first use and shared by the categories that need it."""

    def __init__(self, settings: CompBenchSettings, device: torch.device | str, parser: PhraseParser) -> None:
        self.settings, self.device = settings, device
        self.parser = parser
        self.models: dict[str, object] = {}
        self.scorers: dict[str, object] = {}

    def model(self, name: str):
        from ..grounding.boxes import GroundingDinoBoxDetector
        from .scorers import BlipYesProbability, ClipSimilarity

        if name not in self.models:
            s = self.settings
            if name == "vqa":
                self.models[name] = BlipYesProbability.from_pretrained(s.vqa_model, device=self.device)
            elif name == "clip":
                self.models[name] = ClipSimilarity.from_pretrained(s.clip_model, device=self.device)
            else:
                self.models[name] = GroundingDinoBoxDetector.from_pretrained(
                    s.detector_model,
                    device=self.device,
                    box_threshold=s.box_threshold,
                    text_threshold=s.text_threshold,
                )
        return self.models[name]

    def __call__(self, category: str):
        from .scorers import BlipVqaScorer, ClipScorer, ComplexScorer, SpatialScorer

        if category not in self.scorers:
            if category in ("color", "shape", "texture"):
                scorer = BlipVqaScorer(self.model("vqa"), self.parser)
            elif category == "non_spatial":
                scorer = ClipScorer(self.model("clip"), self.parser)
            elif category == "spatial":
                scorer = SpatialScorer(self.model("detector"), self.parser)
            else:
                scorer = ComplexScorer(
                    BlipVqaScorer(self.model("vqa"), self.parser),
                    SpatialScorer(self.model("detector"), self.parser, complex_mode=True),
                    ClipScorer(self.model("clip"), self.parser, complex_mode=True),
                )
            self.scorers[category] = scorer
        return self.scorers[category]


def run_compbench_eval(args: argparse.Namespace) -> dict:
    """Run (or resume) the benchmark on this process's shard; process 0 writes the report. Returns the
    paths written (on process 0) and this process's counts of images drawn and items scored."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    settings = settings_from_args(args)
    # Loaded before any image is drawn: a missing spaCy model must not surface only after hours of generation.
    phrase_parser = load_phrase_parser(settings.phrase_parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU: without cpu=True, CPU processes
    # started by `accelerate launch` would each run alone.
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = torch.device(args.device) if args.device else state.device
    output = Path(args.output or DEFAULT_OUTPUT)
    progress = not args.no_progress
    try:
        check_manifest(output, settings)
    except ValueError as error:
        raise UsageError(f"--output {output}: {error}") from None
    prompts = category_prompts(settings.categories, settings.split, settings.prompts_per_category)
    items = plan_work(settings.configurations, prompts, settings.images_per_prompt, settings.seed)
    mine = shard(items, state.process_index, state.num_processes)

    def load_pipeline(unet: str):
        from ..pipeline_realign_diff import RealignDiffPipeline

        kwargs = {}
        if unet == "finetuned":
            kwargs = {"realign_unet": settings.realign_unet, "realign_unet_subfolder": settings.realign_unet_subfolder}
        pipe = RealignDiffPipeline.from_pretrained(settings.model, dtype=getattr(torch, settings.dtype), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def load_grounder(name: str):
        from ..grounding.factory import load_grounder as load

        return load(
            name,
            device=device,
            detector=settings.detector_model,
            segmenter=settings.segmenter_model,
            box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold,
        )

    if state.is_main_process:
        scheduler = _scheduler_of(settings.model)
        manifest = {
            "benchmark": "t2i-compbench",
            "settings": json.loads(json.dumps(asdict(settings))),
            "scheduler": scheduler,
            "versions": package_versions(),
            "num_processes": state.num_processes,
            "prompts": {category: len(listed) for category, listed in prompts.items()},
            "seeds": "image k of a category: SeedSequence([seed, category position in "
            f"{list(T2I_COMPBENCH_CATEGORIES)}, k]).generate_state(1)[0]; every configuration the same; each "
            "score record lists its images' seeds",
            "file_names": "{prompt}_{index:06d}.png, index = prompt index × images per prompt + image",
        }
        if not (output / MANIFEST_FILE).is_file():
            write_atomically(output / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
        # Before the barrier, so that no process of this run is writing yet.
        leftovers = remove_partial_files(output)
        if leftovers:
            print(f"removed {len(leftovers)} half-written file(s) left by an interrupted run in {output}")
    state.wait_for_everyone()
    rank = f"[{state.process_index}/{state.num_processes}]"
    drawn = generate_images(mine, settings, output, load_pipeline, load_grounder, device, progress, f"generate {rank}")
    scored = score_items(mine, output, ScorerCache(settings, device, phrase_parser), progress, f"score {rank}")
    state.wait_for_everyone()
    paths = {}
    if state.is_main_process:
        from .report import write_report

        manifest = json.loads((output / MANIFEST_FILE).read_text())
        paths = write_report(output, read_scores(items, output), manifest, list(prompts), args.report_prompts)
        print(paths["table"].read_text())
        print(f"wrote {paths['json']}, {paths['table']}, {paths['html']}")
    state.wait_for_everyone()
    return {"paths": paths, "drawn": drawn, "scored": scored}


def _scheduler_of(model: str) -> dict:
    """The scheduler class and config of ``model`` (read without loading the pipeline's weights)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model)
    folder = Path(model)
    if folder.is_dir():
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    else:
        from huggingface_hub import hf_hub_download

        scheduler_config = json.loads(Path(hf_hub_download(model, "scheduler/scheduler_config.json")).read_text())
    return {"class": config.get("scheduler", [None, None])[1], "config": scheduler_config}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        run_compbench_eval(parser.parse_args(argv))
    except UsageError as error:  # a user's mistake: one line, as `realign` prints it
        parser.exit(2, f"{parser.prog}: error: {error}\n")
