"""``realign app``: the page that drafts, lets you edit the regions and realigns (``pip install ".[app]"``).

By default it serves the built-in shapes world (its ReFL fine-tuned UNet and the shapes grounder, as
``realign demo`` does) on 127.0.0.1, which answers in about a second on a CPU. ``--model`` takes any Stable
Diffusion folder or Hub id, with ``--realign-unet``, the captioner and the grounder named as ``realign generate``
names them.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
from pathlib import Path

from ..captioners.factory import CAPTIONER_NAMES
from ..errors import UsageError
from ..grounding.factory import GROUNDER_NAMES
from ..llm.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT

# The built-in default model (what `realign demo` runs): the shapes world, its ReFL UNet and its grounder.
SHAPES_WORLD = Path(__file__).resolve().parents[1] / "shapes" / "world"
SHAPES_WORLD_UNET = "unet-refl"
SHAPES_GROUNDER = "shapes"
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_app_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``realign app``'s arguments; the parser's ``run`` is ``run_app``."""
    parser = subparsers.add_parser(
        "app",
        help="a web page to draft, edit the regions and realign (gradio)",
        description="Serve a page on which a prompt is drafted (the coarse pass and its proposed regions), the "
        "regions are renamed, deleted, drawn or boxed, and the fine pass is run from the same noise with the "
        "edited layout. Default model: the built-in shapes world.",
    )
    add_app_arguments(parser)
    parser.set_defaults(run=run_app)
    return parser


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``realign app`` (also used by ``python -m realign_pipeline.app``)."""
    parser.add_argument(
        "--model", default=None, help="Stable Diffusion folder or Hub id (default: the built-in shapes world)"
    )
    parser.add_argument(
        "--realign-unet",
        default=None,
        help="folder or Hub id of a caption-reward fine-tuned UNet (default: the shapes world's unet-refl when "
        "--model is not given)",
    )
    parser.add_argument("--captioner", choices=CAPTIONER_NAMES, default="rule", help="dense captioner (default rule)")
    parser.add_argument("--image-captioner", default=None, help="BLIP/BLIP-2 checkpoint shown to the LLM captioner")
    parser.add_argument("--llm-model", default=None, help="LLM model name (default: $REALIGN_LLM_MODEL)")
    parser.add_argument("--llm-base-url", default=None, help="OpenAI-compatible server (default: $OPENAI_BASE_URL)")
    parser.add_argument("--llm-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per LLM request in all")
    parser.add_argument("--llm-max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="LLM request retries")
    parser.add_argument(
        "--grounder",
        choices=(SHAPES_GROUNDER, *GROUNDER_NAMES),
        default=None,
        help="mask source (default: 'shapes' on the shapes world, else 'attention')",
    )
    parser.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny", help="Grounding DINO checkpoint")
    parser.add_argument("--segmenter", default="facebook/sam-vit-base", help="SAM checkpoint (transformers)")
    parser.add_argument("--box-threshold", type=float, default=0.3)
    parser.add_argument("--text-threshold", type=float, default=0.25)
    parser.add_argument("--sam-checkpoint", default=None, help="segment-anything .pth file")
    parser.add_argument("--sam-model-type", choices=("vit_b", "vit_l", "vit_h"), default=None)
    parser.add_argument("--groundingdino-config", default=None, help="groundingdino-py config file")
    parser.add_argument("--groundingdino-checkpoint", default=None, help="groundingdino-py checkpoint file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="(default: float16 on CUDA, else float32)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """The captioner's and grounder's arguments, checked before any model loads (``UsageError`` names them)."""
    from ..captioners.factory import check_captioner_arguments
    from ..grounding.factory import check_grounder_arguments

    check_captioner_arguments(args.captioner, timeout=args.llm_timeout, max_retries=args.llm_max_retries)
    if args.grounder not in (None, SHAPES_GROUNDER):
        check_grounder_arguments(
            args.grounder,
            sam_checkpoint=args.sam_checkpoint,
            sam_model_type=args.sam_model_type,
            groundingdino_config=args.groundingdino_config,
            groundingdino_checkpoint=args.groundingdino_checkpoint,
        )


def load_engine(args: argparse.Namespace):
    """The pipeline the page drives, loaded as ``args`` say (the shapes world by default)."""
    # Imported here: `realign --help` loads neither torch nor diffusers.
    from ..cli import captioner_from_args, grounder_from_args, resolve_device, resolve_dtype
    from ..pipeline_realign_diff import RealignDiffPipeline
    from .engine import AppEngine

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_model_arguments(args)
    on_world = args.model is None
    if args.grounder == SHAPES_GROUNDER or (args.grounder is None and on_world):
        from ..shapes.grounder import ShapesGrounder

        grounder = ShapesGrounder()
    else:
        grounder = grounder_from_args(args, args.grounder or "attention", device, dtype)
    captioner = captioner_from_args(args, device, dtype)
    unet_kwargs = {"realign_unet": args.realign_unet}
    if on_world and args.realign_unet is None:
        unet_kwargs = {"realign_unet": SHAPES_WORLD, "realign_unet_subfolder": SHAPES_WORLD_UNET}
    pipe = RealignDiffPipeline.from_pretrained(
        SHAPES_WORLD if on_world else args.model,
        dtype=dtype,
        captioner=captioner,
        grounder=grounder,
        **unet_kwargs,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(leave=False)
    return AppEngine(pipe, judge_prompts=on_world)


def run_app(args: argparse.Namespace) -> None:
    """Load the model, build the page and serve it until interrupted."""
    from .ui import build_app, launch

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be in 0..65535")
    engine = load_engine(args)
    # A service manager stops the server with SIGTERM, which by default ends Python without unwinding; taken as
    # Ctrl-C, it makes gradio close the server and the ``with`` below remove the download folder.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # The files offered for download live as long as the server: removed when it stops.
        with tempfile.TemporaryDirectory(prefix="realign-app-") as files_folder:
            demo = build_app(engine, default_prompt=_default_prompt(engine), files_folder=files_folder)
            try:
                launch(demo, host=args.host, port=args.port, block=True)
            except KeyboardInterrupt:
                # Stopped while gradio was still starting (its checks after the server answers), before the loop
                # that takes the interrupt itself: close the server here, and stop as cleanly as from that loop.
                demo.close()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _default_prompt(engine) -> str:
    if engine.judge_prompts:
        from ..shapes import evaluation_prompts

        return evaluation_prompts("binding", "development", n=1)[0]
    return "a red book and a yellow vase"
