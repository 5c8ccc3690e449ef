"""Dense captioners by name, for the command line, configs and short scripts.

    pipe.captioner = load_captioner("openai", image_captioner="Salesforce/blip2-opt-2.7b", device="cuda")

Models load once, here, on the device and dtype given (use the pipeline's), and then serve every call.
They are not pipeline components, so ``enable_model_cpu_offload`` does not move them: give them the
GPU device explicitly when the pipeline offloads. ``check_captioner_arguments`` checks a choice without
loading anything (the CLI calls it before any model loads).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..llm.client import API_KEY_ENV_VAR, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, check_timeout_and_retries

if TYPE_CHECKING:  # torch and the pipeline load with the first model, not with this module (``realign --help``)
    import torch

    from ..pipeline_realign_diff import DenseCaptioner

CAPTIONER_NAMES = ("rule", "openai")


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
        from ..pipeline_realign_diff import PromptPhraseCaptioner

        return PromptPhraseCaptioner()
    if name == "openai":
        from ..llm import JsonChatClient
        from .blip import BlipImageCaptioner
        from .llm import LLMDenseCaptioner

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
