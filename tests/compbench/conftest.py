"""Tiny scorer folders for the T2I-CompBench tests, built once per session."""

import pytest

from tests.compbench.tiny_scorers import save_tiny_blip_vqa, save_tiny_clip
from tests.grounding.tiny_grounding_models import save_tiny_grounding_dino


@pytest.fixture(scope="session")
def scorer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compbench-scorers")
    return {
        "vqa": save_tiny_blip_vqa(root / "blip-vqa"),
        "clip": save_tiny_clip(root / "clip"),
        "detector": save_tiny_grounding_dino(root / "grounding-dino"),
    }
