"""captioners.factory.load_captioner: each captioner by name, its options checked before any model loads."""

import logging
import time

import pytest

from realign_pipeline import LocalCaption, PromptPhraseCaptioner
from realign_pipeline.captioners import LLMDenseCaptioner, LLMFallbackWarning
from realign_pipeline.captioners.factory import load_captioner
from tests.servers.openai_stub import STUB_API_KEY, OpenAIStub, chat_reply, error_reply, trickle_reply


def test_the_rule_captioner_needs_no_model():
    assert isinstance(load_captioner("rule"), PromptPhraseCaptioner)


def test_an_unknown_captioner_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`captioner` must be one of \('rule', 'openai'\)"):
        load_captioner("gpt")


def test_openai_captioner_by_name_talks_to_the_server(tmp_path):
    with OpenAIStub(api_key=STUB_API_KEY) as server:
        server.push(chat_reply({"objects": [{"caption": "a red book", "box": None}]}))
        captioner = load_captioner(
            "openai", base_url=server.url, api_key=STUB_API_KEY, model="stub", cache_dir=tmp_path
        )
        assert isinstance(captioner, LLMDenseCaptioner)
        captions = captioner(None, "a red book and a yellow vase")
        assert [c.text for c in captions] == ["a red book"]
        assert len(server.requests) == 1


def test_openai_captioner_by_name_takes_timeout_and_retries(tmp_path):
    prompt = "a red book and a yellow vase"
    with OpenAIStub() as server:
        server.push(trickle_reply(0.1))  # never finishes; a per-read timeout would wait for it forever
        captioner = load_captioner(
            "openai", base_url=server.url, api_key=STUB_API_KEY, cache_dir=tmp_path, timeout=0.6, max_retries=0
        )
        assert (captioner.client.timeout, captioner.client.max_retries) == (0.6, 0)
        start = time.monotonic()
        with pytest.warns(LLMFallbackWarning, match=r"the server failed \(timeout\)"):
            captions = captioner(None, prompt)
        assert 0.6 <= time.monotonic() - start < 0.6 + 0.6
        assert captions == [LocalCaption("a red book"), LocalCaption("a yellow vase")]
        assert len(server.requests) == 1  # max_retries=0: no second attempt
    defaults = load_captioner("openai", api_key=STUB_API_KEY, cache_dir=tmp_path)
    assert (defaults.client.timeout, defaults.client.max_retries) == (60.0, 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, r"timeout must be a finite number of seconds > 0, got 0"),
        ({"timeout": float("inf")}, r"timeout must be a finite number of seconds > 0, got inf"),
        ({"max_retries": -1}, r"max_retries must be an integer >= 0, got -1"),
        ({"max_retries": 2.5}, r"max_retries must be an integer >= 0, got 2.5"),
    ],
)
def test_openai_captioner_checks_timeout_and_retries_before_loading_models(tmp_path, options, message):
    # The image captioner folder does not exist: reaching it would raise another error.
    with pytest.raises(ValueError, match=message):
        load_captioner(
            "openai", api_key=STUB_API_KEY, cache_dir=tmp_path, image_captioner=tmp_path / "missing", **options
        )


def test_openai_captioner_by_name_never_shows_the_api_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # openai's and httpx's debug records too
    with OpenAIStub(api_key=STUB_API_KEY) as server:
        server.push(error_reply(429), chat_reply({"objects": [{"caption": "a red book", "box": None}]}))
        captioner = load_captioner(
            "openai", base_url=server.url, api_key=STUB_API_KEY, model="stub", cache_dir=tmp_path, max_retries=1
        )
        assert [c.text for c in captioner(None, "a red book")] == ["a red book"]
        assert len(server.requests) == 2 and server.requests[0].authorization == f"Bearer {STUB_API_KEY}"
    assert "retry 1 of 1" in caplog.text  # the logs were captured
    shown = [
        repr(captioner),
        str(captioner),
        repr(captioner.client),
        repr(vars(captioner)),
        repr(vars(captioner.client)),
    ]
    shown += [caplog.text] + [repr(record.__dict__) for record in caplog.records]
    for text in shown:
        assert STUB_API_KEY not in text
    assert "api_key='***'" in repr(captioner.client)
