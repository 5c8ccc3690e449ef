"""The options of ``realign eval --benchmark t2i-compbench`` (and of ``python -m realign_pipeline.compbench``),
with the defaults the benchmark's modules share. Light on purpose: ``realign --help`` builds this parser
without importing torch, so nothing here imports a model library.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..prompts import T2I_COMPBENCH_CATEGORIES, T2I_COMPBENCH_SPLITS
from .configurations import COMPBENCH_CONFIGURATION_NAMES

BENCHMARKS = ("shapes", "layout", "t2i-compbench")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_IMAGES_PER_PROMPT = 10  # T2I-CompBench's protocol: ten images per prompt
PHRASE_PARSERS: tuple[str, ...] = ("rule", "spacy")
DEFAULT_VQA_MODEL = "Salesforce/blip-vqa-capfilt-large"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DETECTOR_MODEL = "IDEA-Research/grounding-dino-tiny"
DEFAULT_OUTPUT = Path("outputs/t2i-compbench")
# T2I-CompBench's generation settings (SD's defaults), where `realign eval` leaves them unset.
COMPBENCH_STEPS = 50
COMPBENCH_GUIDANCE_SCALE = 7.5


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_compbench_arguments(parser: argparse.ArgumentParser) -> None:
    """The T2I-CompBench options, added to ``realign eval``'s parser (whose ``--seed``, ``--steps``,
    ``--guidance-scale``, ``--batch-size``, ``--coarse-stop-fraction``, ``--device`` and ``--threads`` it shares)."""
    group = parser.add_argument_group("T2I-CompBench (--benchmark t2i-compbench)")
    group.add_argument("--model", default=None, help="Stable Diffusion repo id or folder (t2i-compbench: required)")
    group.add_argument("--realign-unet", default=None, help="fine-tuned UNet repo id or folder (finetuned, full rows)")
    group.add_argument("--realign-unet-subfolder", default="unet", help="its subfolder ('' for none; default unet)")
    group.add_argument(
        "--categories", nargs="+", choices=T2I_COMPBENCH_CATEGORIES, default=list(T2I_COMPBENCH_CATEGORIES)
    )
    group.add_argument("--compbench-split", choices=T2I_COMPBENCH_SPLITS, default="val", help="(default val)")
    group.add_argument(
        "--compbench-configurations",
        nargs="+",
        choices=COMPBENCH_CONFIGURATION_NAMES,
        default=None,
        metavar="NAME",
        help=f"rows, of {', '.join(COMPBENCH_CONFIGURATION_NAMES)} (default: all that need no fine-tuned UNet, "
        "and all with --realign-unet)",
    )
    group.add_argument(
        "--compbench-prompts", type=positive_int, default=None, help="first N prompts per category (default all)"
    )
    group.add_argument("--images-per-prompt", type=positive_int, default=DEFAULT_IMAGES_PER_PROMPT)
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--height", type=positive_int, default=None)
    group.add_argument("--width", type=positive_int, default=None)
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="generation dtype (default float32)")
    group.add_argument("--phrase-parser", choices=PHRASE_PARSERS, default="spacy", help="(default spacy: official)")
    group.add_argument("--vqa-model", default=DEFAULT_VQA_MODEL, help=f"BLIP VQA (default {DEFAULT_VQA_MODEL})")
    group.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP (default {DEFAULT_CLIP_MODEL})")
    group.add_argument("--detector-model", default=DEFAULT_DETECTOR_MODEL, help="Grounding DINO (spatial)")
    group.add_argument("--segmenter-model", default="facebook/sam-vit-base", help="SAM of the grounding-sam rows")
    group.add_argument("--box-threshold", type=float, default=0.3)
    group.add_argument("--text-threshold", type=float, default=0.25)
    group.add_argument("--report-prompts", type=positive_int, default=4, help="prompts per image grid (default 4)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
