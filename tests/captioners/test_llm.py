"""LLMDenseCaptioner against a real HTTP server (tests/servers/openai_stub.py), through the real openai client."""

import logging
import time
import warnings

import openai
import pytest
from PIL import Image

from realign_pipeline import LocalCaption, PromptPhraseCaptioner
from realign_pipeline.captioners import (
    DEFAULT_TEMPLATE,
    LLMDenseCaptioner,
    LLMFallbackWarning,
    words_not_in_prompt,
)
from realign_pipeline.llm import JsonChatClient

from ..servers.openai_stub import STUB_API_KEY, OpenAIStub, chat_reply, error_reply, slow_reply, trickle_reply

PROMPT = "a red book and a yellow vase on a wooden table"
GOOD = {
    "objects": [
        {"caption": "a red book", "box": [0.0, 0.4, 0.5, 1.0]},
        {"caption": "a yellow vase", "box": None},
        {"caption": "a wooden table", "box": [0.5, 0.5, 0.2, 0.9]},  # empty box: dropped
        {"caption": "a  red book", "box": None},  # duplicate
    ]
}
NOT_IN_PROMPT = {"objects": [{"caption": "a red book", "box": None}, {"caption": "a blue cat", "box": None}]}
RULE_BASED = PromptPhraseCaptioner().phrases(PROMPT)


class FixedCaptioner:
    def __init__(self, caption):
        self.text = caption
        self.calls = 0

    def caption(self, images):
        self.calls += 1
        return [self.text for _ in images]


class FixedTagger:
    def tags(self, images):
        return [["book", "vase", "table", "window"] for _ in images]


def make_client(server: OpenAIStub, tmp_path, **options) -> JsonChatClient:
    options = {"timeout": 5.0, "max_retries": 2, "initial_backoff": 0.01, "max_backoff": 0.02, **options}
    return JsonChatClient(
        model="stub-model", base_url=server.url, api_key=STUB_API_KEY, cache_dir=tmp_path / "cache", **options
    )


@pytest.fixture
def image():
    return Image.new("RGB", (16, 16), (200, 30, 30))


def test_rule_based_reference():
    assert RULE_BASED == ["a red book", "a yellow vase", "a wooden table"]


def test_local_captions_from_prompt_caption_and_tags(openai_stub, tmp_path, image):
    openai_stub.push(chat_reply(GOOD))
    blip = FixedCaptioner("a red book next to a vase")
    captioner = LLMDenseCaptioner(make_client(openai_stub, tmp_path), image_captioner=blip, tagger=FixedTagger())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLMFallbackWarning)
        captions = captioner(image, PROMPT)
    assert captions == [
        LocalCaption("a red book", (0.0, 0.4, 0.5, 1.0)),
        LocalCaption("a yellow vase", None),
        LocalCaption("a wooden table", None),
    ]
    (request,) = openai_stub.requests
    (message,) = request.body["messages"]
    assert message["role"] == "user"
    assert f"Prompt: {PROMPT}\n" in message["content"]
    assert "Caption of the generated image: a red book next to a vase\n" in message["content"]
    assert "Tags recognised in the generated image: book, vase, table, window\n" in message["content"]
    assert request.body["response_format"]["json_schema"]["name"] == "local_captions"


def test_tags_default_to_the_caption_words_and_no_captioner_means_none(openai_stub, tmp_path, image):
    openai_stub.push(chat_reply(GOOD), chat_reply(GOOD))
    client = make_client(openai_stub, tmp_path, use_cache=False)
    LLMDenseCaptioner(client, image_captioner=FixedCaptioner("a red book on a wooden table"))(image, PROMPT)
    LLMDenseCaptioner(client)(image, PROMPT)
    with_caption, without = (r.body["messages"][0]["content"] for r in openai_stub.requests)
    assert "Tags recognised in the generated image: red, book, wooden, table\n" in with_caption
    assert "Caption of the generated image: (none)\n" in without
    assert "Tags recognised in the generated image: (none)\n" in without


def test_cache_prevents_a_second_request(openai_stub, tmp_path, image):
    openai_stub.push(chat_reply(GOOD))
    blip = FixedCaptioner("a red book")
    first = LLMDenseCaptioner(make_client(openai_stub, tmp_path), image_captioner=blip)(image, PROMPT)
    second = LLMDenseCaptioner(make_client(openai_stub, tmp_path), image_captioner=blip)(image, PROMPT)
    assert first == second and len(openai_stub.requests) == 1
    # Another caption of the image is another question.
    openai_stub.push(chat_reply(GOOD))
    LLMDenseCaptioner(make_client(openai_stub, tmp_path), image_captioner=FixedCaptioner("a vase"))(image, PROMPT)
    assert len(openai_stub.requests) == 2


@pytest.mark.parametrize(
    "bad",
    [
        chat_reply('{"objects": [{"caption": "a red book", "box": null}'),  # malformed JSON
        chat_reply({"objects": [{"caption": "a red book"}]}),  # fails the schema (no box)
        chat_reply({"objects": []}),  # fails the schema (no object)
        chat_reply(NOT_IN_PROMPT),  # names an object the prompt does not have
    ],
    ids=["malformed", "schema", "empty", "not-in-prompt"],
)
def test_an_unusable_answer_is_asked_for_once_more(openai_stub, tmp_path, image, bad):
    openai_stub.push(bad, chat_reply(GOOD))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLMFallbackWarning)
        captions = LLMDenseCaptioner(make_client(openai_stub, tmp_path))(image, PROMPT)
    assert [c.text for c in captions] == ["a red book", "a yellow vase", "a wooden table"]
    assert len(openai_stub.requests) == 2


def test_two_unusable_answers_fall_back_to_prompt_phrases_with_a_warning(openai_stub, tmp_path, image, caplog):
    openai_stub.push(chat_reply(NOT_IN_PROMPT), chat_reply("sorry, I cannot do JSON"))
    captioner = LLMDenseCaptioner(make_client(openai_stub, tmp_path))
    with pytest.warns(LLMFallbackWarning, match="PromptPhraseCaptioner") as record:
        captions = captioner(image, PROMPT)
    assert captions == [LocalCaption(text) for text in RULE_BASED]
    assert len(openai_stub.requests) == 2
    assert "not valid JSON" in str(record[0].message)
    # Nothing rejected was cached: the next call asks again.
    openai_stub.push(chat_reply(GOOD))
    assert [c.text for c in captioner(image, PROMPT)] == RULE_BASED
    assert len(openai_stub.requests) == 3


def test_unusable_answer_check_is_about_content_words():
    assert words_not_in_prompt("the red book on the left", PROMPT) == []
    assert words_not_in_prompt("a blue book", PROMPT) == ["blue"]
    LLMDenseCaptioner.check_answer({"objects": [{"caption": "a red book", "box": None}]}, PROMPT)
    with pytest.raises(ValueError, match="names no object"):
        LLMDenseCaptioner.check_answer({"objects": [{"caption": "a the", "box": None}]}, PROMPT)


def test_server_failures_after_client_retries_fall_back(openai_stub, tmp_path, image):
    openai_stub.push(*[error_reply(500)] * 3)
    with pytest.warns(LLMFallbackWarning, match=r"HTTP 500") as record:
        captions = LLMDenseCaptioner(make_client(openai_stub, tmp_path, max_retries=2))(image, PROMPT)
    assert [c.text for c in captions] == RULE_BASED
    assert len(openai_stub.requests) == 3  # the client's retries, and no second round on top
    assert STUB_API_KEY not in str(record[0].message)


def test_rate_limit_and_slow_answer_are_retried_by_the_client(openai_stub, tmp_path, image):
    openai_stub.push(error_reply(429), slow_reply(chat_reply(GOOD), 3.0), chat_reply(GOOD))
    client = make_client(openai_stub, tmp_path, timeout=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLMFallbackWarning)
        captions = LLMDenseCaptioner(client)(image, PROMPT)
    assert len(captions) == 3 and len(openai_stub.requests) == 3


def test_server_without_structured_outputs(tmp_path, image):
    with OpenAIStub(reject_response_formats={"json_schema"}) as server:
        server.push(chat_reply(GOOD))
        captions = LLMDenseCaptioner(make_client(server, tmp_path))(image, PROMPT)
        assert len(captions) == 3
        assert [r.response_format for r in server.requests] == ["json_schema", "json_object"]


def test_configuration_errors_are_raised_not_hidden(openai_stub, tmp_path, image, caplog):
    caplog.set_level(logging.DEBUG)
    client = JsonChatClient(base_url=openai_stub.url, api_key="sk-not-the-right-one", cache_dir=tmp_path)
    with pytest.raises(openai.AuthenticationError) as error:
        LLMDenseCaptioner(client)(image, PROMPT)
    assert len(openai_stub.requests) == 1
    assert "sk-not-the-right-one" not in str(error.value) + caplog.text


def test_an_unknown_model_is_raised_after_one_request(openai_stub, tmp_path, image):
    message = "The model `stub-model` does not exist or you do not have access to it."
    openai_stub.push(error_reply(400, message, code="model_not_found"))
    client = make_client(openai_stub, tmp_path)
    with pytest.raises(openai.BadRequestError, match=message):
        LLMDenseCaptioner(client)(image, PROMPT)
    assert [r.response_format for r in openai_stub.requests] == ["json_schema"]
    assert client.accepted_response_format is None


def test_a_trickling_server_is_cut_off_and_falls_back(openai_stub, tmp_path, image):
    openai_stub.push(trickle_reply(0.1), trickle_reply(0.1))
    client = make_client(openai_stub, tmp_path, timeout=0.5, max_retries=1)
    start = time.monotonic()
    with pytest.warns(LLMFallbackWarning, match=r"the server failed \(timeout\)"):
        captions = LLMDenseCaptioner(client)(image, PROMPT)
    assert 1.0 <= time.monotonic() - start < 1.0 + 0.8  # two attempts of 0.5 s, a 0.01 s backoff, a margin
    assert [c.text for c in captions] == RULE_BASED
    assert len(openai_stub.requests) == 2


def test_custom_template(openai_stub, tmp_path, image):
    openai_stub.push(chat_reply(GOOD))
    template = 'Objects of "{prompt}"? Tags: {tags}. Caption: {caption}. JSON like {{"objects": []}}.'
    LLMDenseCaptioner(make_client(openai_stub, tmp_path), prompt_template=template)(image, PROMPT)
    content = openai_stub.requests[0].body["messages"][0]["content"]
    assert content == f'Objects of "{PROMPT}"? Tags: (none). Caption: (none). JSON like {{"objects": []}}.'
    with pytest.raises(ValueError, match="double literal braces"):
        LLMDenseCaptioner(make_client(openai_stub, tmp_path), prompt_template='{"objects": []} {prompt}')
    with pytest.raises(ValueError, match=r"\{prompt\}, \{caption\} and \{tags\}"):
        LLMDenseCaptioner(make_client(openai_stub, tmp_path), prompt_template="{prompt} {image}")
    assert all(field in DEFAULT_TEMPLATE for field in ("{prompt}", "{caption}", "{tags}"))
