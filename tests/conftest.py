"""Shared fixtures: a small Stable Diffusion pipeline saved to a folder, loaded like a Hub repo."""

import os

# Tests never reach the Hub: every model is built from a config and saved locally first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from realign_pipeline.toy_pipeline import save_toy_pipeline  # noqa: E402

# One intra-op thread: the suite's models are tiny, and on a shared 2-core machine more threads than
# cores stall (a small training run measured 41 s with 2 threads under load, 6 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_pipeline_folder(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Stable Diffusion pipeline saved as an ordinary diffusers folder."""
    return save_toy_pipeline(tmp_path_factory.mktemp("toy-sd"))
