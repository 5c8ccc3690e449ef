import pytest

from ..servers.openai_stub import OpenAIStub
from .tiny_blip import save_tiny_blip, save_tiny_blip2


@pytest.fixture
def openai_stub():
    """A scripted OpenAI-compatible server on 127.0.0.1 that expects ``STUB_API_KEY``."""
    with OpenAIStub() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_blip_folder(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_blip2_folder(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))
