"""realign-pipeline: RealignDiff (arXiv 2305.19599) for diffusers."""

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
