"""The ``realign`` command: ``generate``, ``demo``, ``eval`` (the judged ablation table on the shapes world),
``train``, ``push`` and ``world train`` / ``world finetune``.

Each command is an ``add_<name>_parser(subparsers)`` that sets ``run`` to the function doing the work. Heavy
modules (torch, diffusers, transformers) are imported inside those functions, so ``realign --help`` is quick.
A user's mistake raises ``UsageError`` (``realign_pipeline.errors``), found before any model loads where no
model is needed to find it; ``main`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .app.command import add_app_parser
from .captioners.factory import CAPTIONER_NAMES
from .compbench.options import BENCHMARKS, COMPBENCH_GUIDANCE_SCALE, COMPBENCH_STEPS, add_compbench_arguments
from .errors import UsageError
from .grounding.factory import GROUNDER_NAMES
from .llm.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from .options import check_model_source
from .shapes.command import WORLD, add_world_parser
from .shapes.data import EVAL_PROMPTS_PER_CATEGORY, PROMPT_SPLITS
from .training.command import add_push_parser, add_train_parser

if TYPE_CHECKING:
    import torch

    from .shapes.layout_control import LayoutDemo

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# The shapes world's benchmarks' defaults (`realign eval`, --benchmark shapes and layout): 25 DDIM steps at
# guidance 4, four seeds per prompt for the ablation and eight per layout for layout control.
SHAPES_STEPS = 25
SHAPES_GUIDANCE_SCALE = 4.0
SHAPES_SEEDS = 4
LAYOUT_SEEDS = 8


def read_prompts(prompt: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` (repeatable) and/or a text file with one prompt per line."""
    prompts = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {prompts_file}: no such file (a text file with one prompt per line)")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts-file {prompts_file}: the file holds no prompts (one prompt per line)")
        prompts += from_file
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    return prompts


def check_output_folder(flag: str, value: str | Path) -> None:
    """``value`` may become a folder: it is one already, or does not exist yet."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: a file is in the way; name a folder (it is created if missing)")


def resolve_device(value: str | None) -> str:
    """``--device``: a torch device this machine has; ``None`` picks CUDA when it is there, else the CPU."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"--device {value}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {value}: MPS is not available on this machine; use --device cpu")
    return value


def resolve_dtype(value: str | None, device: str) -> torch.dtype:
    """``--dtype`` by name; ``None``: float16 on CUDA, else float32."""
    import torch

    return getattr(torch, value or ("float16" if device.startswith("cuda") else "float32"))


def load_or_usage_error(flag: str, value: str, load: Callable[[], Any]) -> Any:
    """``load()``, with a model that cannot be found (an ``OSError`` from ``from_pretrained``) as a ``UsageError``."""
    try:
        return load()
    except OSError as error:
        from huggingface_hub import constants

        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if constants.HF_HUB_OFFLINE and not Path(value).exists():
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        raise UsageError(f"{flag} {value}: cannot load it ({reason})") from None


def captioner_from_args(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    """The dense captioner ``--captioner`` and its options name (``realign generate`` and ``realign app``)."""
    from .captioners.factory import load_captioner

    return load_captioner(
        args.captioner,
        device=device,
        dtype=dtype,
        image_captioner=args.image_captioner,
        model=args.llm_model,
        base_url=args.llm_base_url,
        timeout=args.llm_timeout,
        max_retries=args.llm_max_retries,
    )


def grounder_from_args(args: argparse.Namespace, name: str, device: str, dtype: torch.dtype) -> Any:
    """The grounder ``name`` with the options ``--detector``, ``--segmenter``, thresholds and checkpoints give
    (``realign generate`` and ``realign app``)."""
    from .grounding.factory import load_grounder

    return load_grounder(
        name,
        device=device,
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
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps per pass (default 50)")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=7.5, help="(default 7.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=multiple_of_8, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=multiple_of_8, default=None, help="pixels (default: the model's)")
    parser.add_argument(
        "--coarse-stop-fraction", type=fraction, default=0.3, help="where the coarse pass stops, in (0, 1]"
    )
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
    parser.add_argument("--box-threshold", type=unit_interval, default=0.3, help="in [0, 1] (default 0.3)")
    parser.add_argument("--text-threshold", type=unit_interval, default=0.25, help="in [0, 1] (default 0.25)")
    parser.add_argument("--sam-checkpoint", default=None, help="segment-anything .pth file")
    parser.add_argument(
        "--sam-model-type",
        choices=("vit_b", "vit_l", "vit_h"),
        default=None,
        help="the --sam-checkpoint's model (default: read from the checkpoint)",
    )
    parser.add_argument("--groundingdino-config", default=None, help="groundingdino-py config file")
    parser.add_argument("--groundingdino-checkpoint", default=None, help="groundingdino-py checkpoint file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="(default: float16 on CUDA, else float32)")
    parser.set_defaults(run=run_generate, usage_prog=parser.prog)


def write_outputs(output: Any, prompts: list[str], folder: Path, notes: list[list[str]] | None = None) -> Path:
    """Write final and coarse images, one PNG per mask, ``layouts.json`` and ``panel.png``."""
    import PIL.Image

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
    # Every check that needs no model first: a mistake costs nothing and leaves nothing behind.
    from .captioners.factory import check_captioner_arguments
    from .grounding.factory import check_grounder_arguments

    prompts = read_prompts(args.prompt, args.prompts_file)
    check_model_source("--model", args.model, ["model_index.json"])
    unet_subfolder = "unet"
    if args.realign_unet is not None:
        check_model_source("--realign-unet", args.realign_unet, ["unet/config.json", "config.json"])
        if (Path(args.realign_unet) / "config.json").is_file():
            unet_subfolder = None  # the folder is the UNet itself
    if args.image_captioner is not None:
        if args.captioner != "openai":
            raise UsageError("--image-captioner: only the openai captioner reads one; add --captioner openai")
        check_model_source("--image-captioner", args.image_captioner, ["config.json"])
    if args.grounder in ("grounding-sam", "segment-anything"):
        check_model_source("--detector", args.detector, ["config.json"])
    if args.grounder == "grounding-sam" or (args.grounder == "groundingdino-py" and args.sam_checkpoint is None):
        check_model_source("--segmenter", args.segmenter, ["config.json"])
    check_output_folder("--output", args.output)
    for flag, check in (
        (
            "--captioner",
            lambda: check_captioner_arguments(
                args.captioner, timeout=args.llm_timeout, max_retries=args.llm_max_retries
            ),
        ),
        (
            "--grounder",
            lambda: check_grounder_arguments(
                args.grounder,
                sam_checkpoint=args.sam_checkpoint,
                groundingdino_config=args.groundingdino_config,
                groundingdino_checkpoint=args.groundingdino_checkpoint,
            ),
        ),
    ):
        try:
            check()
        except UsageError as error:
            raise UsageError(f"{flag} {getattr(args, flag[2:])}: {error}") from None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    import torch
    from diffusers import UNet2DConditionModel

    from .pipeline_realign_diff import RealignDiffPipeline

    captioner = captioner_from_args(args, device, dtype)
    grounder = grounder_from_args(args, args.grounder, device, dtype)
    components = {}
    if args.realign_unet is not None:
        components["unet"] = load_or_usage_error(
            "--realign-unet",
            args.realign_unet,
            lambda: UNet2DConditionModel.from_pretrained(
                args.realign_unet, subfolder=unet_subfolder, use_safetensors=True, dtype=dtype
            ),
        )
    pipe = load_or_usage_error(
        "--model",
        args.model,
        lambda: RealignDiffPipeline.from_pretrained(
            args.model, dtype=dtype, captioner=captioner, grounder=grounder, **components
        ),
    )
    pipe.to(device)
    output = pipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=torch.Generator(device).manual_seed(args.seed),
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
    parser.add_argument("--output", default="outputs/demo", help="folder for the images (default outputs/demo)")
    parser.add_argument("--steps", type=positive_int, default=25, help="denoising steps per pass (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_demo, usage_prog=parser.prog)


# The built-in default model: a small Stable Diffusion trained by this project on coloured shapes.
BUILTIN_WORLD = WORLD
# The demo's UNet: the world's ReFL fine-tuned UNet (``realign world finetune --method refl``).
DEMO_UNET = "unet-refl"
TOY_DEMO_PROMPTS = ["a red book and a yellow vase", "a green cat on the left of a blue car"]


def demo_prompts() -> list[str]:
    """Development prompts of the shapes world that name pairings its UNet never saw drawn together."""
    from .shapes import evaluation_prompts

    # Development prompts: they name held-out pairings too, and the evaluation prompts stay for the tables.
    return evaluation_prompts("binding", "development", n=3) + evaluation_prompts("relation", "development", n=1)


def run_demo(args: argparse.Namespace) -> None:
    check_output_folder("--output", args.output)
    import tempfile

    import torch

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
        layout_demo = None
        if folder == BUILTIN_WORLD:
            from .shapes.layout_control import WORLD_LAYOUT_SETTINGS, draw_layout_demo, layout_prompts

            # Layout control (``realign eval --benchmark layout``) for one development prompt and seed, at the
            # world's own settings (its model card).
            layout_demo = draw_layout_demo(
                pipe, layout_prompts("development", 1)[0], args.seed, args.steps, **WORLD_LAYOUT_SETTINGS
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
    if layout_demo is not None:
        from .shapes.layout_control import WORLD_LAYOUT_SETTINGS

        settings = ", ".join(f"{name} {value:g}" for name, value in WORLD_LAYOUT_SETTINGS.items())
        print(f"layout control at the world's settings (its model card): {settings}")
        write_layout_demo(layout_demo, out_folder)
    print(f"wrote coarse images, masks, final images and panel.png to {out_folder}")


def write_layout_demo(demo: LayoutDemo, folder: Path) -> Path:
    """``layout-panel.png``: per layout, the plain image, each region over it, and the
    re-weighted image, with the judge's in-region shares for both; the verdicts are printed too."""
    from .shapes.layout_control import placement_note
    from .visualize import save_layout_panels

    notes = []
    for case, plain, moved in zip(demo.cases, demo.plain_scores, demo.scores):
        notes.append([placement_note("plain", case, plain), placement_note("re-weighted", case, moved)])
        print(f"layout control, {case.prompt!r}, {case.kind}{' swapped' if case.swapped else ''}:")
        for line in notes[-1]:
            print(f"    {line}")
    path = save_layout_panels(
        demo.images,
        demo.layouts,
        folder / "layout-panel.png",
        [demo.plain_image] * len(demo.images),
        notes=notes,
        labels=("plain", "re-weighted"),
    )
    print(f"wrote {path} (layout control: the same noise drawn plain and with each region layout)")
    return path


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


def multiple_of_8(text: str) -> int:
    """argparse type: a positive multiple of 8 (image sides: the VAE halves them three times)."""
    value = _int_at_least(text, 8, "a positive multiple of 8")
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value} (try {value // 8 * 8 or 8})")
    return value


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


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="benchmarks: the judged ablation on the shapes world, layout control, T2I-CompBench",
        description="Generate the shapes world's evaluation prompts with each configuration (base UNet, attention "
        "re-weighting with attention-map, grounded or true masks, fine-tuned UNets, both), judge every image with the "
        "rule-based judge, and print a Markdown table of accuracies with 95% Wilson intervals, then paired "
        "differences between rows with 95% intervals over prompts. Every configuration draws the same prompts and "
        "seeds from the same initial noise. Each finished row is saved in --output/checkpoints; run the same command "
        "again to resume after a kill. Fine-tuned UNets are read from subfolders of --world (unet-refl, "
        "unet-ranked), made by realign world finetune. --benchmark layout: each object of two- and three-object "
        "prompts given a region (halves, thirds, boxes, each assignment and its swap), plain and re-weighted from the "
        "same noise, judged. --benchmark t2i-compbench: a Stable Diffusion model (--model) on T2I-CompBench's "
        "prompts, scored by BLIP-VQA, CLIPScore and Grounding DINO; shards with accelerate launch.",
    )
    parser.add_argument(
        "--benchmark",
        choices=BENCHMARKS,
        default="shapes",
        help="shapes (the ablation table, default), layout (layout control on the shapes world), t2i-compbench",
    )
    parser.add_argument(
        "--world", type=Path, default=BUILTIN_WORLD, help="shapes-world pipeline folder (default: the built-in one)"
    )
    parser.add_argument(
        "--configurations",
        nargs="+",
        default=None,
        metavar="NAME",
        help="rows of the table, in order (default: all; an unknown name lists them)",
    )
    parser.add_argument("--split", choices=PROMPT_SPLITS, default="held_out", help="prompt split (default held_out)")
    parser.add_argument(
        "--prompts-per-category",
        type=positive_int,
        default=EVAL_PROMPTS_PER_CATEGORY,
        help=f"prompts per category (default {EVAL_PROMPTS_PER_CATEGORY}; a category may hold fewer)",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="images per prompt (per layout for --benchmark layout), each from its own noise, the same in every row "
        f"(default {SHAPES_SEEDS}; layout {LAYOUT_SEEDS})",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"denoising steps per pass (default {SHAPES_STEPS}; t2i-compbench {COMPBENCH_STEPS})",
    )
    parser.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=None,
        help=f"(default {SHAPES_GUIDANCE_SCALE}; t2i-compbench {COMPBENCH_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="each image's noise comes from (seed, category, prompt index, seed index), the same in every row "
        "(default 0)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument(
        "--coarse-stop-fraction",
        type=fraction,
        default=0.3,
        help="re-weighting rows: where the coarse pass stops (default 0.3, the pipeline's; 1.0: the paper's)",
    )
    parser.add_argument(
        "--full-unet",
        default="unet-refl",
        help="the fine-tuned UNet subfolder of the 'full' configuration (default unet-refl)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="folder for results (default outputs/eval, outputs/layout-control)"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cpu for shapes and layout; t2i-compbench: accelerate's device per process)",
    )
    weights = parser.add_argument_group(
        "re-weighting strengths (shapes and layout; the pipeline's defaults, DenseDiffusion's, unless a world's own "
        "were chosen on the development split)"
    )
    weights.add_argument("--cross-attention-weight", type=non_negative_float, default=1.0, help="(default 1.0)")
    weights.add_argument("--self-attention-weight", type=non_negative_float, default=0.3, help="(default 0.3)")
    weights.add_argument("--modulation-fraction", type=fraction, default=0.3, help="(default 0.3)")
    layout = parser.add_argument_group("layout control (--benchmark layout)")
    layout.add_argument("--layout-unet", default="unet", help="the world's UNet subfolder (default unet)")
    add_compbench_arguments(parser)
    parser.set_defaults(run=run_eval, usage_prog=parser.prog)


def run_eval(args: argparse.Namespace) -> None:
    """``realign eval``: the benchmark ``--benchmark`` names, with that benchmark's defaults for what is unset."""
    if args.benchmark == "t2i-compbench":
        from .compbench.command import run_compbench_eval

        args.steps = args.steps or COMPBENCH_STEPS
        args.guidance_scale = COMPBENCH_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
        run_compbench_eval(args)
        return
    args.steps = args.steps or SHAPES_STEPS
    args.guidance_scale = SHAPES_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    args.device = args.device or "cpu"
    if args.benchmark == "layout":
        run_layout_eval(args)
    else:
        run_shapes_eval(args)


def run_layout_eval(args: argparse.Namespace) -> None:
    """``realign eval --benchmark layout``: plain vs re-weighted placement on the world, paired, as a table."""
    import torch

    unet_folder = Path(args.world) / args.layout_unet
    if not (unet_folder / "config.json").is_file():
        raise UsageError(f"--layout-unet {args.layout_unet}: no UNet at {unet_folder} (a folder with config.json)")
    output = args.output or Path("outputs/layout-control")
    check_output_folder("--output", output)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    from .pipeline_realign_diff import RealignDiffPipeline
    from .shapes.layout_control import format_layout_table, layout_cases, layout_prompts, run_layout_control

    prompts = layout_prompts(args.split, args.prompts_per_category)
    unet = UNet2DConditionModel.from_pretrained(args.world, subfolder=args.layout_unet, dtype=torch.float32)
    pipe = RealignDiffPipeline.from_pretrained(args.world, unet=unet, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    seeds = args.seeds or LAYOUT_SEEDS
    result = run_layout_control(
        pipe,
        layout_cases(prompts, seed=args.seed),
        [args.seed * 1000 + index for index in range(seeds)],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        cross_attention_weight=args.cross_attention_weight,
        self_attention_weight=args.self_attention_weight,
        modulation_fraction=args.modulation_fraction,
    )
    settings = {
        "world": str(args.world),
        "unet": args.layout_unet,
        "split": args.split,
        "prompts": len(prompts),
        "seeds": seeds,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "cross_attention_weight": args.cross_attention_weight,
        "self_attention_weight": args.self_attention_weight,
        "modulation_fraction": args.modulation_fraction,
    }
    summary = {"settings": settings, **result.summary()}
    table = format_layout_table(summary)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "table.md").write_text(table + "\n")
    print(table)
    print(
        f"\n{len(prompts)} {args.split} binding prompts x layouts x {seeds} seeds; placed: every object drawn with "
        "at least 70% of its pixels in its region; share: mean fraction of an object's pixels in its region "
        "(0 when not drawn); present: every object drawn; placed when present: placed among the images with every "
        "object drawn, of how many. Difference: re-weighted minus plain from the same noise, 95% interval over "
        "prompts."
    )
    print(f"wrote {output / 'results.json'} and {output / 'table.md'}")


def run_shapes_eval(args: argparse.Namespace) -> None:
    import torch

    from .shapes.evaluate import (
        CONFIGURATION_NAMES,
        FINETUNED_UNETS,
        EvalSettings,
        check_world,
        format_criteria_table,
        format_pairs_table,
        format_table,
        paired_comparisons,
        run_evaluation,
        select_configurations,
        write_report,
    )

    # Every check before any model loads: a bad argument costs nothing.
    if args.full_unet not in FINETUNED_UNETS:
        raise UsageError(f"--full-unet {args.full_unet}: must be one of {', '.join(FINETUNED_UNETS)}")
    try:
        configurations = select_configurations(args.configurations or CONFIGURATION_NAMES, full_unet=args.full_unet)
    except ValueError as error:
        raise UsageError(f"--configurations: {error}") from None
    try:
        check_world(args.world, configurations)
    except FileNotFoundError as error:
        raise UsageError(f"--world: {error}") from None
    args.output = args.output or Path("outputs/eval")
    check_output_folder("--output", args.output)
    device = resolve_device(args.device)
    settings = EvalSettings(
        split=args.split,
        prompts_per_category=args.prompts_per_category,
        seeds=args.seeds or SHAPES_SEEDS,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        coarse_stop_fraction=args.coarse_stop_fraction,
        cross_attention_weight=args.cross_attention_weight,
        self_attention_weight=args.self_attention_weight,
        modulation_fraction=args.modulation_fraction,
        device=device,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results = run_evaluation(args.world, configurations, settings, checkpoints=args.output / "checkpoints")
    paths = write_report(results, settings, args.world, args.output)
    print(format_table(results))
    print(
        f"\naccuracy in % (every check passed), 95% Wilson interval in brackets; s/image is generation wall time "
        f"only ({settings.split} prompts, {settings.seeds} seed(s) each, {settings.num_inference_steps} steps, "
        f"guidance {settings.guidance_scale}; re-weighting rows: cross {settings.cross_attention_weight}, self "
        f"{settings.self_attention_weight}, {settings.modulation_fraction:.0%} of the steps)\n"
    )
    print(format_criteria_table(results))
    print("\neach category's own check alone, in % with its 95% Wilson interval\n")
    comparisons = paired_comparisons(results)
    if comparisons:
        print(format_pairs_table(comparisons))
        print(
            "\ndifference in strict pass rate (points), first row minus second over the same images; 95% paired "
            "interval over prompts (per-prompt mean over seeds, then Student t)\n"
        )
    print(f"wrote {paths['json']}, {paths['table']} and contact sheets {args.output}/contact-sheet-*.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realign", description="RealignDiff for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_demo_parser(subparsers)
    add_eval_parser(subparsers)
    add_train_parser(subparsers)
    add_push_parser(subparsers)
    add_world_parser(subparsers)
    add_app_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run the command; a ``UsageError`` ends as one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as error:
        print(f"{getattr(args, 'usage_prog', 'realign')}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
