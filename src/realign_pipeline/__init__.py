"""realign-pipeline: RealignDiff (arXiv 2305.19599) for diffusers."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline_realign_diff import (
        AttentionModulationState,
        CrossAttentionRecorder,
        DenseCaptioner,
        DroppedRegion,
        Grounder,
        Layout,
        LocalCaption,
        PromptPhraseCaptioner,
        RealignAttnProcessor,
        RealignDiffPipeline,
        RealignDiffPipelineOutput,
        Region,
        realign_processors_installed,
        reweighted_attention_fast,
        reweighted_attention_reference,
    )

__version__ = "0.1.0"

__all__ = [
    "AttentionModulationState",
    "CrossAttentionRecorder",
    "DenseCaptioner",
    "DroppedRegion",
    "Grounder",
    "Layout",
    "LocalCaption",
    "PromptPhraseCaptioner",
    "RealignAttnProcessor",
    "RealignDiffPipeline",
    "RealignDiffPipelineOutput",
    "Region",
    "realign_processors_installed",
    "reweighted_attention_fast",
    "reweighted_attention_reference",
]


def __getattr__(name: str) -> Any:
    """The pipeline's names load on first use, so ``realign --help`` and light submodules do not import
    torch and diffusers."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import pipeline_realign_diff

    return getattr(pipeline_realign_diff, name)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
