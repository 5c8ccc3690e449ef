import pytest

from ..servers.openai_stub import OpenAIStub


@pytest.fixture
def openai_stub():
    """A scripted OpenAI-compatible server on 127.0.0.1 that expects ``STUB_API_KEY``."""
    with OpenAIStub() as server:
        yield server
