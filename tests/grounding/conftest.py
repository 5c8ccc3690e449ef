"""Fixtures: tiny Grounding DINO and SAM folders, built once per session."""

import pytest
from tiny_grounding_models import save_tiny_grounding_dino, save_tiny_sam


@pytest.fixture(scope="session")
def tiny_grounding_dino_folder(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("grounding-dino"))


@pytest.fixture(scope="session")
def tiny_sam_folder(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam"))
