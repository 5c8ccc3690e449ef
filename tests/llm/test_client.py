"""JsonChatClient against a real HTTP server (tests/servers/openai_stub.py), through the real openai client."""

import json
import logging
import re
import sys
import time
import traceback

import openai
import pytest

from realign_pipeline.llm import (
    JsonChatClient,
    LLMResponseError,
    LLMTimeoutError,
    SchemaValidationError,
    schema_errors,
    validate_json,
)

from ..servers.openai_stub import (
    STUB_API_KEY,
    OpenAIStub,
    chat_reply,
    error_reply,
    raw_error_reply,
    slow_reply,
    trickle_reply,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "score": {"type": "integer", "enum": [1, 2, 3]}},
                "required": ["name", "score"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["objects"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "system", "content": "You list objects."}, {"role": "user", "content": "a red book"}]
ANSWER = {"objects": [{"name": "book", "score": 3}]}


def make_client(server: OpenAIStub, tmp_path, **options) -> JsonChatClient:
    options = {"timeout": 5.0, "max_retries": 3, "initial_backoff": 0.01, "max_backoff": 0.05, **options}
    return JsonChatClient(
        model="stub-model", base_url=server.url, api_key=STUB_API_KEY, cache_dir=tmp_path / "cache", **options
    )


def test_structured_output_request_and_answer(openai_stub, tmp_path):
    openai_stub.push(chat_reply(ANSWER))
    client = make_client(openai_stub, tmp_path, temperature=0.0)
    assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    (request,) = openai_stub.requests
    assert request.authorization == f"Bearer {STUB_API_KEY}"
    assert request.body["model"] == "stub-model"
    assert request.body["messages"] == MESSAGES
    assert request.body["temperature"] == 0.0
    response_format = request.body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"] == {"name": "response", "schema": SCHEMA, "strict": True}


def test_cache_prevents_a_second_request_and_is_written_atomically(openai_stub, tmp_path):
    openai_stub.push(chat_reply(ANSWER))
    assert make_client(openai_stub, tmp_path).complete_json(MESSAGES, SCHEMA) == ANSWER
    # A new client (a new process, say) over the same folder answers from disk.
    assert make_client(openai_stub, tmp_path).complete_json(MESSAGES, SCHEMA) == ANSWER
    assert len(openai_stub.requests) == 1
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{64}\.json", files[0])  # no temporary file left behind
    # The key covers the messages and the schema: another question is another request.
    openai_stub.push(chat_reply(ANSWER))
    make_client(openai_stub, tmp_path).complete_json(MESSAGES[:1], SCHEMA)
    assert len(openai_stub.requests) == 2
    # use_cache=False neither reads nor writes.
    openai_stub.push(chat_reply(ANSWER))
    make_client(openai_stub, tmp_path, use_cache=False).complete_json(MESSAGES, SCHEMA)
    assert len(openai_stub.requests) == 3


def test_retries_on_429_500_and_timeout_then_succeeds(openai_stub, tmp_path, caplog):
    openai_stub.push(
        error_reply(429, "slow down"),
        error_reply(500, "boom"),
        slow_reply(chat_reply(ANSWER), delay=3.0),
        chat_reply(ANSWER),
    )
    client = make_client(openai_stub, tmp_path, timeout=0.3, initial_backoff=0.01, max_backoff=1.0)
    with caplog.at_level(logging.WARNING, logger="realign_pipeline.llm.client"):
        assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    assert len(openai_stub.requests) == 4
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert "HTTP 429" in retries[0] and "HTTP 500" in retries[1] and "timeout" in retries[2]
    # Exponential backoff: 0.01, 0.02, 0.04 s.
    assert [float(re.search(r"in ([\d.]+) s", m).group(1)) for m in retries] == [0.01, 0.02, 0.04]


def test_retry_after_header_is_honoured_up_to_max_backoff(openai_stub, tmp_path, caplog):
    openai_stub.push(error_reply(429, headers={"retry-after": "0"}), chat_reply(ANSWER))
    # Without the header the wait would be 30 s.
    client = make_client(openai_stub, tmp_path, initial_backoff=30.0, max_backoff=60.0)
    with caplog.at_level(logging.WARNING, logger="realign_pipeline.llm.client"):
        assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    assert "in 0.00 s" in caplog.records[-1].getMessage()


def test_gives_up_after_max_retries_and_does_not_retry_client_errors(openai_stub, tmp_path):
    openai_stub.push(*[error_reply(503, "overloaded")] * 3)
    with pytest.raises(openai.InternalServerError):
        make_client(openai_stub, tmp_path, max_retries=2).complete_json(MESSAGES, SCHEMA)
    assert len(openai_stub.requests) == 3
    client = JsonChatClient(
        model="m", base_url=openai_stub.url, api_key="sk-wrong", cache_dir=tmp_path, max_retries=3, initial_backoff=0
    )
    with pytest.raises(openai.AuthenticationError):
        client.complete_json(MESSAGES, SCHEMA)
    assert len(openai_stub.requests) == 4  # a 401 is not retried


def test_falls_back_to_json_object_then_plain_when_the_server_rejects_formats(tmp_path):
    with OpenAIStub(reject_response_formats={"json_schema"}) as server:
        server.push(chat_reply(ANSWER), chat_reply(ANSWER))
        client = make_client(server, tmp_path, use_cache=False)
        assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
        assert [r.response_format for r in server.requests] == ["json_schema", "json_object"]
        # The schema moves into the (first) system message, which json_object mode needs anyway.
        messages = server.requests[1].body["messages"]
        assert len(messages) == 2 and messages[0]["content"].startswith("You list objects.")
        assert json.dumps(SCHEMA) in messages[0]["content"] and "JSON" in messages[0]["content"]
        # The client remembers what the server accepts.
        client.complete_json(MESSAGES, SCHEMA)
        assert [r.response_format for r in server.requests][2:] == ["json_object"]

    with OpenAIStub(reject_response_formats={"json_schema", "json_object"}) as server:
        server.push(chat_reply("```json\n" + json.dumps(ANSWER) + "\n```"))
        assert make_client(server, tmp_path, use_cache=False).complete_json(MESSAGES[1:], SCHEMA) == ANSWER
        assert [r.response_format for r in server.requests] == ["json_schema", "json_object", None]
        assert server.requests[-1].body["messages"][0]["role"] == "system"  # added: there was none


UNKNOWN_MODEL = "The model `no-such-model` does not exist or you do not have access to it."


@pytest.mark.parametrize(
    "error",
    [
        error_reply(400, UNKNOWN_MODEL, code="model_not_found"),
        error_reply(400, "This model's maximum context length is 4096 tokens.", param="messages"),
        error_reply(404, UNKNOWN_MODEL, code="model_not_found"),
    ],
    ids=["400-unknown-model", "400-context-length", "404-unknown-model"],
)
def test_other_client_errors_raise_at_once_and_keep_the_remembered_format(tmp_path, error):
    message = error.body["error"]["message"]
    # A fresh client: one request, the server's message, nothing remembered.
    with OpenAIStub() as server:
        server.push(error)
        client = make_client(server, tmp_path, use_cache=False)
        with pytest.raises(openai.APIStatusError, match=re.escape(message)):
            client.complete_json(MESSAGES, SCHEMA)
        assert [r.response_format for r in server.requests] == ["json_schema"]
        assert client.accepted_response_format is None
    # A client that has learnt json_object: the error costs one json_object request and changes nothing.
    with OpenAIStub(reject_response_formats={"json_schema"}) as server:
        server.push(chat_reply(ANSWER), error)
        client = make_client(server, tmp_path, use_cache=False)
        client.complete_json(MESSAGES, SCHEMA)
        assert client.accepted_response_format == "json_object"
        with pytest.raises(openai.APIStatusError, match=re.escape(message)):
            client.complete_json(MESSAGES, SCHEMA)
        assert [r.response_format for r in server.requests] == ["json_schema", "json_object", "json_object"]
        assert client.accepted_response_format == "json_object"


@pytest.mark.parametrize(
    "rejection",
    [
        error_reply(
            400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
        ),
        error_reply(400, "Invalid value.", param="response_format"),
        error_reply(400, "JSON mode is not supported for this model."),
        raw_error_reply(422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "bad value"}]}),
    ],
    ids=["openai-message", "param-only", "json-mode", "fastapi-422"],
)
def test_only_a_refused_response_format_falls_back(tmp_path, rejection):
    with OpenAIStub() as server:
        server.push(rejection, chat_reply(ANSWER))
        client = make_client(server, tmp_path, use_cache=False)
        assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
        assert [r.response_format for r in server.requests] == ["json_schema", "json_object"]
        assert client.accepted_response_format == "json_object"


def test_a_trickling_answer_is_cut_off_at_the_total_timeout(openai_stub, tmp_path, caplog):
    # One byte every 0.1 s: a per-read timeout of 0.8 s never fires, the total limit must.
    openai_stub.push(trickle_reply(0.1), trickle_reply(0.1, phase="headers"))
    client = make_client(openai_stub, tmp_path, timeout=0.8, max_retries=1, initial_backoff=0.01)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="realign_pipeline.llm.client"):
        with pytest.raises(LLMTimeoutError, match=r"timeout=0\.8 s \(a total limit per request") as error:
            client.complete_json(MESSAGES, SCHEMA)
    elapsed = time.monotonic() - start
    assert 1.6 <= elapsed < 1.6 + 0.8  # two attempts of 0.8 s (body, then header trickle), plus a margin
    assert "2 attempt(s)" in str(error.value)
    assert isinstance(error.value.__cause__, openai.APITimeoutError)
    assert len(openai_stub.requests) == 2
    assert "LLM request failed (timeout); retry 1 of 1" in caplog.text
    # Connections are not reused, so a request after a normal answer is cut off as well.
    openai_stub.push(chat_reply(ANSWER), trickle_reply(0.1))
    client = make_client(openai_stub, tmp_path, timeout=0.8, max_retries=0, use_cache=False)
    assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    start = time.monotonic()
    with pytest.raises(LLMTimeoutError, match="1 attempt"):
        client.complete_json(MESSAGES, SCHEMA)
    assert 0.8 <= time.monotonic() - start < 0.8 + 0.6


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), "5", True])
def test_timeout_must_be_positive_and_finite(tmp_path, timeout):
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0"):
        JsonChatClient(api_key=STUB_API_KEY, cache_dir=tmp_path, timeout=timeout)


@pytest.mark.parametrize("max_retries", [-1, 1.5, "2", None])
def test_max_retries_must_be_a_non_negative_integer(tmp_path, max_retries):
    with pytest.raises(ValueError, match=r"max_retries must be an integer >= 0"):
        JsonChatClient(api_key=STUB_API_KEY, cache_dir=tmp_path, max_retries=max_retries)


def test_invalid_answers_raise_and_are_not_cached(openai_stub, tmp_path):
    client = make_client(openai_stub, tmp_path)
    openai_stub.push(chat_reply('{"objects": [{"name": "book", "score": 3}'))  # cut off
    with pytest.raises(LLMResponseError, match="not valid JSON") as error:
        client.complete_json(MESSAGES, SCHEMA)
    assert error.value.content.startswith('{"objects"')
    openai_stub.push(chat_reply({"objects": [{"name": "book", "score": 5}]}))
    with pytest.raises(LLMResponseError, match=r"\$\.objects\[0\]\.score"):
        client.complete_json(MESSAGES, SCHEMA)
    openai_stub.push(chat_reply("[1, 2]"))
    with pytest.raises(LLMResponseError, match="not an object"):
        client.complete_json(MESSAGES, SCHEMA)

    def no_books(answer):
        if any(o["name"] == "book" for o in answer["objects"]):
            raise ValueError("no books please")

    openai_stub.push(chat_reply(ANSWER))
    with pytest.raises(LLMResponseError, match="no books please"):
        client.complete_json(MESSAGES, SCHEMA, check=no_books)
    # Nothing was cached, so the next call asks the server again (invalid answers are not retried here).
    openai_stub.push(chat_reply(ANSWER))
    assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    assert len(openai_stub.requests) == 5


def test_api_key_never_in_repr_logs_or_exceptions(openai_stub, tmp_path, caplog):
    client = make_client(openai_stub, tmp_path, timeout=0.3, max_retries=2)
    assert STUB_API_KEY not in repr(client) and STUB_API_KEY not in str(client)
    assert "***" in repr(client)
    texts = []
    caplog.set_level(logging.DEBUG)  # openai's and httpx's debug records too
    openai_stub.push(error_reply(429), slow_reply(chat_reply(ANSWER), 3.0), chat_reply("not json"))
    with pytest.raises(LLMResponseError) as invalid:
        client.complete_json(MESSAGES, SCHEMA)
    openai_stub.push(*[error_reply(500)] * 3)
    with pytest.raises(openai.InternalServerError) as exhausted:
        client.complete_json(MESSAGES, SCHEMA)
    for error in (invalid.value, exhausted.value):
        texts.append("".join(traceback.format_exception(error)))
    wrong = JsonChatClient(base_url=openai_stub.url, api_key=STUB_API_KEY + "x", cache_dir=tmp_path)
    with pytest.raises(openai.AuthenticationError) as unauthorised:
        wrong.complete_json(MESSAGES, SCHEMA)
    texts.append("".join(traceback.format_exception(unauthorised.value)))
    texts.append(caplog.text)
    texts.extend(str(record.__dict__) for record in caplog.records)
    assert any("retry" in record.getMessage() for record in caplog.records)
    assert len(openai_stub.requests) == 7
    for text in texts:
        assert STUB_API_KEY not in text


def test_arguments_fall_back_to_environment_variables(openai_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", STUB_API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", openai_stub.url)
    monkeypatch.setenv("REALIGN_LLM_MODEL", "model-from-env")
    openai_stub.push(chat_reply(ANSWER))
    client = JsonChatClient(cache_dir=tmp_path)
    assert client.complete_json(MESSAGES, SCHEMA) == ANSWER
    assert openai_stub.requests[0].body["model"] == "model-from-env"
    assert JsonChatClient(model="explicit", cache_dir=tmp_path).model == "explicit"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        JsonChatClient(cache_dir=tmp_path)


def test_missing_openai_names_the_extra(monkeypatch, tmp_path):
    # None in sys.modules makes `import openai` fail, as on an install without the [llm] extra.
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=re.escape('pip install "realign-pipeline[llm]"')):
        JsonChatClient(api_key=STUB_API_KEY, cache_dir=tmp_path)


def test_schema_validator_subset():
    validate_json(ANSWER, SCHEMA)
    validate_json({"objects": [{"name": "book", "score": 3.0}]}, SCHEMA)  # JSON has no int/float distinction
    errors = schema_errors({"objects": [{"name": 1, "score": True, "extra": 0}], "more": 1}, SCHEMA)
    assert errors == [
        "$.objects[0].name: expected string, got int",
        "$.objects[0].score: expected integer, got bool",
        "$.objects[0]: unexpected property 'extra'",
        "$: unexpected property 'more'",
    ]
    assert schema_errors({}, SCHEMA) == ["$: missing required property 'objects'"]
    box = {"type": ["array", "null"], "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 4}
    assert schema_errors(None, box) == [] and schema_errors([0, 0.5, 1, 1], box) == []
    assert schema_errors([0, 2, 1], box) == ["$: 3 items, fewer than 4", "$[1]: 2 is greater than 1"]
    assert schema_errors("x", {"enum": ["a", "b"]}) == ["$: 'x' is not one of ['a', 'b']"]
    with pytest.raises(SchemaValidationError) as error:
        validate_json([], {"type": "object"})
    assert error.value.errors == ["$: expected object, got list"]
    with pytest.raises(ValueError, match="Unsupported JSON Schema keywords"):
        validate_json("x", {"type": "string", "pattern": "^x$"})
