"""The ``realign`` command: ``generate``, ``demo``, ``eval`` (the judged ablation table on the shapes world),
and ``train``, ``push`` where installed."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch

from .llm.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from .preprocessors import CAPTIONER_NAMES, GROUNDER_NAMES, load_captioner, load_grounder
from .shapes.data import EVAL_PROMPTS_PER_CATEGORY
from .shapes.evaluate import CONFIGURATION_NAMES, FINETUNED_UNETS, SPLITS
from .training.command import add_push_parser, add_train_parser

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_prompts(prompt: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` (repeatable) and/or a text file with one prompt per line."""
    prompts = list(prompt or [])
    if prompts_file:
        prompts += [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    return prompts


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with RealignDiff",
        description="Run RealignDiff's coarse and fine passes on prompts and write images, masks and a panel.",
    )
    parser.add_argument("--model", required=True, help="base Stable Diffusion repo id or folder")
    parser.add_argument("--realign-unet", default=None, help="repo id or folder of a caption-reward fine-tuned UNet")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--output", default="outputs/generate", help="folder for images, masks and layouts")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per pass (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--coarse-stop-fraction", type=float, default=0.3)
    parser.add_argument("--no-realign", action="store_true", help="plain Stable Diffusion, for comparison")
    parser.add_argument("--captioner", choices=CAPTIONER_NAMES, default="rule", help="dense captioner (default rule)")
    parser.add_argument("--image-captioner", default=None, help="BLIP/BLIP-2 checkpoint shown to the LLM captioner")
    parser.add_argument("--llm-model", default=None, help="LLM model name (default: $REALIGN_LLM_MODEL)")
    parser.add_argument("--llm-base-url", default=None, help="OpenAI-compatible server (default: $OPENAI_BASE_URL)")
    parser.add_argument(
        "--llm-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per LLM request in all, however slowly the server answers (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--llm-max-retries",
        type=non_negative_int,
        default=DEFAULT_MAX_RETRIES,
        help=f"retries of an LLM request that timed out or failed transiently (default {DEFAULT_MAX_RETRIES})",
    )
    parser.add_argument(
        "--grounder", choices=GROUNDER_NAMES, default="attention", help="mask source (default attention)"
    )
    parser.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny", help="Grounding DINO checkpoint")
    parser.add_argument("--segmenter", default="facebook/sam-vit-base", help="SAM checkpoint (transformers)")
    parser.add_argument("--box-threshold", type=float, default=0.3)
    parser.add_argument("--text-threshold", type=float, default=0.25)
    parser.add_argument("--sam-checkpoint", default=None, help="segment-anything .pth file")
    parser.add_argument(
        "--sam-model-type",
        choices=("vit_b", "vit_l", "vit_h"),
        default=None,
        help="the --sam-checkpoint's model (default: read from the checkpoint)",
    )
    parser.add_argument("--groundingdino-config", default=None, help="groundingdino-py config file")
    parser.add_argument("--groundingdino-checkpoint", default=None, help="groundingdino-py checkpoint file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float16" if torch.cuda.is_available() else "float32"
    )
    parser.set_defaults(run=run_generate)


def write_outputs(output, prompts: list[str], folder: Path, notes: list[list[str]] | None = None) -> Path:
    """Write final and coarse images, one PNG per mask, ``layouts.json`` and ``panel.png``."""
    from .visualize import save_layout_panels

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, image in enumerate(output.images):
        image.save(folder / f"{index:03d}-final.png")
        record = {"image": f"{index:03d}-final.png"}
        if output.coarse_images is not None:
            output.coarse_images[index].save(folder / f"{index:03d}-coarse.png")
            record["coarse_image"] = f"{index:03d}-coarse.png"
        if output.layouts is not None:
            layout = output.layouts[index]
            record["prompt"] = layout.prompt
            record["regions"] = []
            for region_index, region in enumerate(layout.regions):
                mask_name = f"{index:03d}-mask{region_index}.png"
                PIL.Image.fromarray(region.mask.numpy().astype("uint8") * 255).save(folder / mask_name)
                record["regions"].append(
                    {
                        "caption": region.caption,
                        "mask": mask_name,
                        "tokens": region.token_indices,
                        "source": region.source,
                    }
                )
            record["dropped"] = [{"caption": d.caption, "reason": d.reason} for d in layout.dropped]
        records.append(record)
    (folder / "layouts.json").write_text(json.dumps(records, indent=2))
    if output.layouts is not None:
        save_layout_panels(output.images, output.layouts, folder / "panel.png", output.coarse_images, notes=notes)
    return folder


def run_generate(args: argparse.Namespace) -> None:
    from .pipeline_realign_diff import RealignDiffPipeline

    prompts = read_prompts(args.prompt, args.prompts_file)
    dtype = DTYPES[args.dtype]
    captioner = load_captioner(
        args.captioner,
        device=args.device,
        dtype=dtype,
        image_captioner=args.image_captioner,
        model=args.llm_model,
        base_url=args.llm_base_url,
        timeout=args.llm_timeout,
        max_retries=args.llm_max_retries,
    )
    grounder = load_grounder(
        args.grounder,
        device=args.device,
        dtype=dtype,
        detector=args.detector,
        segmenter=args.segmenter,
        box_threshold=args.box_threshold,
        text_threshold=args.text_threshold,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type,
        groundingdino_config=args.groundingdino_config,
        groundingdino_checkpoint=args.groundingdino_checkpoint,
    )
    pipe = RealignDiffPipeline.from_pretrained(
        args.model, realign_unet=args.realign_unet, dtype=dtype, captioner=captioner, grounder=grounder
    )
    pipe.to(args.device)
    output = pipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        realign=not args.no_realign,
        coarse_stop_fraction=args.coarse_stop_fraction,
    )
    folder = write_outputs(output, prompts, Path(args.output))
    print(f"wrote {len(output.images)} image(s) to {folder}")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run RealignDiff end to end on the built-in default model",
        description="Run both passes on a few prompts with the built-in default model (no download) and write "
        "the coarse images, the masks and the final images to --output.",
    )
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_demo)


# The built-in default model: a small Stable Diffusion trained by this project on coloured shapes.
BUILTIN_WORLD = Path(__file__).parent / "shapes" / "world"
# The demo's UNet: the world's ReFL fine-tuned UNet (``python -m realign_pipeline.shapes.finetune``).
DEMO_UNET = "unet-refl"
TOY_DEMO_PROMPTS = ["a red book and a yellow vase", "a green cat on the left of a blue car"]


def demo_prompts() -> list[str]:
    """Development prompts of the shapes world that name pairings its UNet never saw drawn together."""
    from .shapes import evaluation_prompts

    # Development prompts: they name held-out pairings too, and the evaluation prompts stay for the tables.
    return evaluation_prompts("binding", "development", n=3) + evaluation_prompts("relation", "development", n=1)


def run_demo(args: argparse.Namespace) -> None:
    from .pipeline_realign_diff import RealignDiffPipeline

    with tempfile.TemporaryDirectory() as scratch:
        realign_unet, grounder = None, None
        if (BUILTIN_WORLD / "model_index.json").exists():
            from .shapes.grounder import ShapesGrounder

            # The full method, as in the paper: the caption-reward fine-tuned UNet draws the coarse image,
            # a grounder (the world's stand-in for Grounding DINO + SAM) masks its objects, the fine pass re-weights.
            realign_unet = BUILTIN_WORLD if (BUILTIN_WORLD / DEMO_UNET / "config.json").exists() else None
            grounder = ShapesGrounder()
            print(
                f"demo model: the shapes world ({BUILTIN_WORLD}), a small Stable Diffusion trained by this project "
                f"on coloured shapes (see its README.md), with the {DEMO_UNET if realign_unet else 'base'} UNet and "
                "the shapes grounder; prompts are held-out pairings, judged by realign_pipeline.shapes.judge."
            )
            folder, prompts, guidance_scale = BUILTIN_WORLD, demo_prompts(), 4.0
        else:
            from .toy_pipeline import save_toy_pipeline

            print(
                "demo model: a tiny Stable Diffusion pipeline built from configs with RANDOM weights "
                "(realign_pipeline.toy_pipeline); it draws noise, but runs every code path of the real method."
            )
            folder, prompts, guidance_scale = save_toy_pipeline(scratch), TOY_DEMO_PROMPTS, 7.5
        pipe = RealignDiffPipeline.from_pretrained(
            folder, realign_unet=realign_unet, realign_unet_subfolder=DEMO_UNET, grounder=grounder
        )
        output = pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
            coarse_stop_fraction=1.0,  # a full coarse pass, so the panel compares two finished images
        )
    notes = None
    if folder == BUILTIN_WORLD:
        from .shapes import judge

        notes = []
        for prompt, coarse, final in zip(prompts, output.coarse_images, output.images):
            verdicts = {name: judge(image, prompt) for name, image in (("coarse", coarse), ("final", final))}
            notes.append(
                [
                    f"judge, {name}: {'PASS' if v.passed else 'fail'} ({'; '.join(v.reasons) or 'all checks hold'})"
                    for name, v in verdicts.items()
                ]
            )
    out_folder = write_outputs(output, prompts, Path(args.output), notes=notes)
    for index, layout in enumerate(output.layouts):
        regions = ", ".join(f"{r.caption!r} ({r.source}, tokens {r.token_indices})" for r in layout.regions)
        print(f"{layout.prompt!r}: {regions}")
        for line in notes[index] if notes else []:
            print(f"    {line}")
    print(f"wrote coarse images, masks, final images and panel.png to {out_folder}")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the argument in its error)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="the judged ablation table of RealignDiff on the shapes world",
        description="Generate the shapes world's evaluation prompts with each configuration (base UNet, attention "
        "re-weighting with attention-map, grounded or true masks, fine-tuned UNets, both), judge every image with the "
        "rule-based judge, and print a Markdown table of accuracies with 95% Wilson intervals. Every "
        "configuration draws the same prompts from the same initial noise. Fine-tuned UNets are read from "
        "subfolders of --world (unet-refl, unet-ranked), made by python -m realign_pipeline.shapes.finetune.",
    )
    parser.add_argument(
        "--world", type=Path, default=BUILTIN_WORLD, help="shapes-world pipeline folder (default: the built-in one)"
    )
    parser.add_argument(
        "--configurations",
        nargs="+",
        choices=CONFIGURATION_NAMES,
        default=list(CONFIGURATION_NAMES),
        metavar="NAME",
        help=f"rows of the table, in order (default: all of {', '.join(CONFIGURATION_NAMES)})",
    )
    parser.add_argument("--split", choices=SPLITS, default="held_out", help="prompt split (default held_out)")
    parser.add_argument(
        "--prompts-per-category",
        type=positive_int,
        default=EVAL_PROMPTS_PER_CATEGORY,
        help=f"prompts per category (default {EVAL_PROMPTS_PER_CATEGORY}; a category may hold fewer)",
    )
    parser.add_argument("--steps", type=positive_int, default=25, help="denoising steps per pass (default 25)")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=4.0, help="(default 4.0)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="each prompt's noise comes from (seed, category, prompt index), the same in every row (default 0)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per pipeline call (default 16)")
    parser.add_argument(
        "--coarse-stop-fraction",
        type=fraction,
        default=0.3,
        help="re-weighting rows: where the coarse pass stops (default 0.3, the pipeline's; 1.0: the paper's)",
    )
    parser.add_argument(
        "--full-unet",
        choices=FINETUNED_UNETS,
        default="unet-refl",
        help="the fine-tuned UNet subfolder of the 'full' configuration (default unet-refl)",
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/eval"), help="folder for results.json, PNGs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from .shapes.evaluate import (
        EvalSettings,
        check_world,
        format_criteria_table,
        format_table,
        run_evaluation,
        select_configurations,
        write_report,
    )

    # Every check before any model loads: a bad argument costs nothing.
    try:
        configurations = select_configurations(args.configurations, full_unet=args.full_unet)
    except ValueError as error:
        raise SystemExit(f"error: --configurations: {error}") from None
    try:
        check_world(args.world, configurations)
    except FileNotFoundError as error:
        raise SystemExit(f"error: --world: {error}") from None
    settings = EvalSettings(
        split=args.split,
        prompts_per_category=args.prompts_per_category,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        coarse_stop_fraction=args.coarse_stop_fraction,
        device=args.device,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results = run_evaluation(args.world, configurations, settings)
    paths = write_report(results, settings, args.world, args.output)
    print(format_table(results))
    print(
        f"\naccuracy in % (every check passed), 95% Wilson interval in brackets; s/image is generation wall time "
        f"only ({settings.split} prompts, {settings.num_inference_steps} steps, guidance {settings.guidance_scale})\n"
    )
    print(format_criteria_table(results))
    print("\neach category's own check alone, in % with its 95% Wilson interval\n")
    print(f"wrote {paths['json']}, {paths['table']} and contact sheets {args.output}/contact-sheet-*.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realign", description="RealignDiff for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_demo_parser(subparsers)
    add_eval_parser(subparsers)
    add_train_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
