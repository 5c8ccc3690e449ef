"""T2I-CompBench on real models: ``realign eval --benchmark t2i-compbench``.

Generation of the official validation prompts under each configuration of the ablation (``configurations``),
resumable and sharded over processes with accelerate (``generate``), the official scores through
transformers models (``scorers``), and the report (``report``). ``command`` holds the command-line entry.
"""

from .configurations import ALL_CONFIGURATIONS, COMPBENCH_CONFIGURATION_NAMES, CompBenchConfiguration
from .plan import WorkItem, image_file_name, image_seed, plan_work, shard
from .spatial import find_relation, position_score, spatial_score

__all__ = [
    "ALL_CONFIGURATIONS",
    "COMPBENCH_CONFIGURATION_NAMES",
    "CompBenchConfiguration",
    "WorkItem",
    "find_relation",
    "image_file_name",
    "image_seed",
    "plan_work",
    "position_score",
    "shard",
    "spatial_score",
]
