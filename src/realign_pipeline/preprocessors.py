"""Dense captioners and grounders by name, for the command line and short scripts.

    pipe.captioner = load_captioner("openai", image_captioner="Salesforce/blip2-opt-2.7b", device="cuda")
    pipe.grounder = load_grounder("grounding-sam", device="cuda", dtype=torch.float16)

Models load once, here, on the device and dtype given (use the pipeline's), and then serve every call.
They are not pipeline components, so ``enable_model_cpu_offload`` does not move them: give them the
GPU device explicitly when the pipeline offloads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .llm.client import API_KEY_ENV_VAR, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, check_timeout_and_retries

if TYPE_CHECKING:  # torch and the pipeline load with the first model, not with this module (``realign --help``)
    import torch

    from .pipeline_realign_diff import DenseCaptioner, Grounder

CAPTIONER_NAMES = ("rule", "openai")
GROUNDER_NAMES = ("attention", "grounding-sam", "segment-anything", "groundingdino-py")


def check_captioner_arguments(
    name: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES
) -> None:
    """What ``load_captioner`` needs, checked without loading anything; ``UsageError`` names the argument."""
    if name not in CAPTIONER_NAMES:
        raise UsageError(f"`captioner` must be one of {CAPTIONER_NAMES}, got {name!r}.")
    if name != "openai":
        return
    check_timeout_and_retries(timeout, max_retries)
    if importlib.util.find_spec("openai") is None:
        raise UsageError('the openai captioner needs the `openai` package: pip install "realign-pipeline[llm]"')
    if not (api_key or os.environ.get(API_KEY_ENV_VAR)):
        raise UsageError(
            f"the openai captioner needs an API key: set ${API_KEY_ENV_VAR} "
            "(for a server without authentication, any non-empty string)"
        )


def check_grounder_arguments(
    name: str,
    *,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_model_type: str | None = None,
    groundingdino_config: str | os.PathLike | None = None,
    groundingdino_checkpoint: str | os.PathLike | None = None,
) -> None:
    """What ``load_grounder`` needs, checked without loading anything; ``UsageError`` names the argument."""
    if name not in GROUNDER_NAMES:
        raise UsageError(f"`grounder` must be one of {GROUNDER_NAMES}, got {name!r}.")
    if name in ("attention", "grounding-sam"):
        return
    if sam_model_type is not None:
        from .grounding.segment_anything_backend import SEGMENT_ANYTHING_MODEL_TYPES

        if sam_model_type not in SEGMENT_ANYTHING_MODEL_TYPES:
            raise UsageError(
                f"`sam_model_type` must be one of {SEGMENT_ANYTHING_MODEL_TYPES}, got {sam_model_type!r}."
            )
    if name == "segment-anything" and sam_checkpoint is None:
        raise UsageError("`sam_checkpoint` is required for the 'segment-anything' grounder (a SAM .pth file).")
    if name == "groundingdino-py" and (groundingdino_config is None or groundingdino_checkpoint is None):
        raise UsageError(
            "the 'groundingdino-py' grounder needs `groundingdino_config` and `groundingdino_checkpoint`."
        )
    for argument, path in (
        ("sam_checkpoint", sam_checkpoint),
        ("groundingdino_config", groundingdino_config),
        ("groundingdino_checkpoint", groundingdino_checkpoint),
    ):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"`{argument}` must be an existing file, got {str(path)!r}.")


def load_captioner(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    image_captioner: str | os.PathLike | None = None,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> DenseCaptioner:
    """A dense captioner by name.

    Args:
        name: ``"rule"`` (the prompt's noun phrases, no model) or ``"openai"`` (RealignDiff's LLM dense
            captioner, through any OpenAI-compatible server; needs the ``[llm]`` extra).
        device, dtype: where the image captioner runs (``"openai"`` with ``image_captioner``).
        image_captioner: a BLIP or BLIP-2 checkpoint whose caption and tags are shown to the LLM.
        model, base_url, api_key: the LLM server (environment variables as fallback: see docs/captioners.md).
        cache_dir: where LLM answers are cached on disk.
        timeout: seconds per LLM request, in all (a server that answers slowly is cut off), > 0.
        max_retries: retries of a request that timed out or failed transiently (HTTP 408/409/429/5xx), >= 0.
            When the last one fails, the captioner warns and uses the rule-based captions.
    """
    # Checked before any model loads: a bad value costs nothing.
    check_captioner_arguments(name, api_key=api_key, timeout=timeout, max_retries=max_retries)
    if name == "rule":
        from .pipeline_realign_diff import PromptPhraseCaptioner

        return PromptPhraseCaptioner()
    if name == "openai":
        from .captioners import BlipImageCaptioner, LLMDenseCaptioner
        from .llm import JsonChatClient

        client = JsonChatClient(
            model=model,
            base_url=base_url,
            api_key=api_key,
            cache_dir=cache_dir,
            timeout=timeout,
            max_retries=max_retries,
        )
        describer = None
        if image_captioner is not None:
            describer = BlipImageCaptioner.from_pretrained(image_captioner, device=device, dtype=dtype)
        return LLMDenseCaptioner(client, image_captioner=describer)
    raise AssertionError("unreachable: check_captioner_arguments knows every name")


def load_grounder(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    detector: str | os.PathLike = "IDEA-Research/grounding-dino-tiny",
    segmenter: str | os.PathLike = "facebook/sam-vit-base",
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_model_type: str | None = None,
    groundingdino_config: str | os.PathLike | None = None,
    groundingdino_checkpoint: str | os.PathLike | None = None,
) -> Grounder | None:
    """A grounder by name; ``"attention"`` returns ``None``: the pipeline's own attention-map masks.

    Args:
        name: ``"attention"``, ``"grounding-sam"`` (Grounding DINO + SAM through transformers, the
            full RealignDiff configuration), ``"segment-anything"`` (Grounding DINO boxes, then the
            ``segment-anything`` package's predictor from ``sam_checkpoint``; ``[sam]`` extra) or
            ``"groundingdino-py"`` (groundingdino-py's model from ``groundingdino_config`` and
            ``groundingdino_checkpoint``, then SAM from ``sam_checkpoint`` if given, else ``segmenter``;
            ``[groundingdino]`` extra).
        device, dtype: where the models run.
        detector, segmenter: transformers checkpoints (Hub ids or folders) of Grounding DINO and SAM.
        box_threshold, text_threshold: Grounding DINO's thresholds (Grounded-SAM's defaults).
        sam_checkpoint, sam_model_type: an original segment-anything checkpoint and its model (``"vit_b"``,
            ``"vit_l"``, ``"vit_h"``), which is read from the checkpoint when not given.
    """
    check_grounder_arguments(
        name,
        sam_checkpoint=sam_checkpoint,
        sam_model_type=sam_model_type,
        groundingdino_config=groundingdino_config,
        groundingdino_checkpoint=groundingdino_checkpoint,
    )
    if name == "attention":
        return None
    from .grounding import (
        GroundedSamGrounder,
        GroundingDinoBoxDetector,
        GroundingDinoPyBoxDetector,
        SamBoxSegmenter,
        SegmentAnythingBoxSegmenter,
    )

    if name == "grounding-sam":
        return GroundedSamGrounder.from_pretrained(
            detector, segmenter, device=device, dtype=dtype, box_threshold=box_threshold, text_threshold=text_threshold
        )
    if name == "segment-anything":
        boxes = GroundingDinoBoxDetector.from_pretrained(
            detector, device=device, dtype=dtype, box_threshold=box_threshold, text_threshold=text_threshold
        )
    else:
        boxes = GroundingDinoPyBoxDetector.from_checkpoint(
            groundingdino_config,
            groundingdino_checkpoint,
            device=device,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
        )
    if sam_checkpoint is not None:
        masks = SegmentAnythingBoxSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_model_type, device=device)
    else:
        masks = SamBoxSegmenter.from_pretrained(segmenter, device=device, dtype=dtype)
    return GroundedSamGrounder(boxes, masks)
