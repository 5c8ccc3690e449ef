"""A chat client that returns JSON checked against a JSON schema, for OpenAI-compatible servers.

Used by the LLM dense captioner (RealignDiff, arXiv 2305.19599: local captions from an LLM given the
prompt and what the image shows) and by the tag reward (FineRewards: an LLM scores each image tag
3 / 2 / 1 against the prompt). It wraps the official ``openai`` client and adds, explicitly:

* **JSON answers.** Structured outputs (``response_format={"type": "json_schema", ...}``) where the
  server supports them; when a server rejects the response format (HTTP 400 / 422 whose error names
  it: ``is_format_unsupported``), the client falls back to ``{"type": "json_object"}`` and then to a
  plain request, with the schema written into the system message, and remembers the first mode that
  worked. Any other 400 / 404 (an unknown model, a bad request) is raised at once, with the server's
  message. Every answer is parsed and validated here (``realign_pipeline.llm.schema``), whatever the mode.
* **Retries.** The ``openai`` client's own retries are switched off (``max_retries=0``) so that every
  retry is this class's: on HTTP 408, 409, 429 and 5xx, timeouts and connection errors, with
  exponential backoff ``initial_backoff · 2^k`` capped at ``max_backoff`` (a server's
  ``Retry-After`` is honoured up to the same cap). Each retry is logged at WARNING.
* **A total timeout.** ``timeout`` bounds each request from sending it to having its whole answer
  (``realign_pipeline.llm.deadline``): httpx's own timeouts are per read, so a server trickling one
  byte a second would otherwise never be cut off. When the last attempt times out, ``LLMTimeoutError``.
* **A disk cache.** One JSON file per request in ``cache_dir``, named by the SHA-256 of
  (model, messages, schema, temperature), written atomically (temporary file, then ``os.replace``),
  so repeated runs over a prompt set cost one request per distinct prompt.
* **No leaked key.** The API key is handed to the ``openai`` client and kept nowhere else: it is not
  in this object's ``repr``, in its log records or in its exceptions.

Environment variables (read only when the matching argument is ``None``):

* ``OPENAI_API_KEY``: the API key (servers without authentication accept any non-empty string);
* ``OPENAI_BASE_URL``: the server, e.g. ``http://localhost:8000/v1`` for a local vLLM;
* ``REALIGN_LLM_MODEL``: the model name (default ``gpt-4o-mini``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .schema import SchemaValidationError, validate_json

logger = logging.getLogger(__name__)

MODEL_ENV_VAR = "REALIGN_LLM_MODEL"
API_KEY_ENV_VAR = "OPENAI_API_KEY"
BASE_URL_ENV_VAR = "OPENAI_BASE_URL"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 4
RESPONSE_FORMATS = ("json_schema", "json_object", "text")
RETRYABLE_STATUS_CODES = frozenset({408, 409, 429})
# Words by which OpenAI, vLLM, llama.cpp, LM Studio, Groq and others say that a response format is
# unsupported (in the message, or in a FastAPI validation error's ``detail``); compared in lower case.
FORMAT_ERROR_MARKERS = (
    "response_format",
    "response format",
    "json_schema",
    "json_object",
    "json mode",
    "structured output",
)
SCHEMA_INSTRUCTION = (
    "Reply with one JSON object and nothing else (no prose, no code fences). It must match this JSON Schema:\n{schema}"
)


class LLMResponseError(ValueError):
    """The server answered, but not with JSON matching the schema (or the caller's ``check`` rejected it)."""

    def __init__(self, message: str, content: str | None = None) -> None:
        super().__init__(message)
        self.content = content


class LLMTimeoutError(TimeoutError):
    """No complete answer within the client's ``timeout`` (a total limit per request), on any attempt."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/realign_pipeline/llm``, or ``~/.cache/realign_pipeline/llm``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "realign_pipeline" / "llm"


def import_openai() -> Any:
    """Import ``openai``, which is an optional dependency, with an install hint when it is missing."""
    try:
        import openai
    except ImportError as error:
        raise ImportError('The LLM client needs the `openai` package: pip install "realign-pipeline[llm]"') from error
    return openai


def is_retryable(error: BaseException) -> bool:
    """Whether ``error`` is transient: a timeout, a connection error, or HTTP 408 / 409 / 429 / 5xx."""
    if isinstance(error, LLMTimeoutError):
        return True
    openai = import_openai()
    if isinstance(error, openai.APIConnectionError):  # APITimeoutError is a subclass
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS_CODES or error.status_code >= 500
    return False


def describe_error(error: BaseException) -> str:
    """A short description for logs: the kind of failure, never the server's message or the request."""
    if isinstance(error, LLMTimeoutError):
        return "timeout"
    openai = import_openai()
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection error"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    return type(error).__name__


def is_format_unsupported(error: BaseException) -> bool:
    """Whether ``error`` is a server refusing the request's ``response_format``, which a fallback mode may avoid.

    Only HTTP 400 / 422 whose error is about the response format count: its ``param`` is
    ``response_format``, or its message or body mentions one of ``FORMAT_ERROR_MARKERS``. Any other
    client error (an unknown model, a context too long, a malformed request) would fail in every mode.
    """
    openai = import_openai()
    if not isinstance(error, openai.APIStatusError) or error.status_code not in (400, 422):
        return False
    if error.param and "response_format" in str(error.param):
        return True
    body = error.body
    body_text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = f"{error.message} {body_text}".lower()
    return any(marker in text for marker in FORMAT_ERROR_MARKERS)


def parse_json_object(content: str) -> dict[str, Any]:
    """Parse a model's answer as one JSON object; code fences around it (plain-text mode) are tolerated."""
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LLMResponseError(f"The answer is not valid JSON ({error.msg} at {error.pos}).", content) from None
    if not isinstance(value, dict):
        raise LLMResponseError(f"The answer is JSON but not an object ({type(value).__name__}).", content)
    return value


class JsonChatClient:
    """Ask an OpenAI-compatible chat server for JSON that matches a schema; retried, cached, validated.

    Args:
        model: model name; ``None`` reads ``$REALIGN_LLM_MODEL``, then uses ``gpt-4o-mini``.
        base_url: server URL ending in ``/v1``; ``None`` reads ``$OPENAI_BASE_URL``, then uses OpenAI's.
        api_key: ``None`` reads ``$OPENAI_API_KEY``; a ``ValueError`` if neither is set.
        timeout: seconds per request attempt, in all: from sending it to having the whole answer,
            however slowly the server sends. A call can take up to ``(max_retries + 1) · timeout``
            plus the backoff waits.
        max_retries: retries after the first attempt, for transient failures only (timeouts included).
        initial_backoff, max_backoff: the wait before retry ``k`` (from 0) is
            ``min(max_backoff, initial_backoff · 2^k)``, or the server's ``Retry-After`` up to ``max_backoff``.
        response_format: ``"auto"`` (structured outputs, falling back as the module docstring says),
            or one of ``"json_schema"``, ``"json_object"``, ``"text"`` to use that mode only.
        strict: ``strict`` flag of the ``json_schema`` format (OpenAI's strict mode needs every property
            listed in ``required`` and ``additionalProperties: false``).
        temperature: sampling temperature; ``None`` leaves the server's default.
        cache_dir: where answers are cached; ``None`` uses ``default_cache_dir()``.
        use_cache: ``False`` disables reading and writing the cache.
    """

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        response_format: str = "auto",
        strict: bool = True,
        temperature: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ) -> None:
        if response_format != "auto" and response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be 'auto' or one of {RESPONSE_FORMATS}, got {response_format!r}.")
        check_timeout_and_retries(timeout, max_retries)
        openai = import_openai()
        from .deadline import DeadlineHttpClient

        self.model = model or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL
        api_key = api_key or os.environ.get(API_KEY_ENV_VAR)
        if not api_key:
            raise ValueError(
                f"No API key: pass api_key= or set ${API_KEY_ENV_VAR} "
                "(for a server without authentication, any non-empty string)."
            )
        base_url = base_url or os.environ.get(BASE_URL_ENV_VAR) or None
        # The key lives only inside the openai client, which neither logs nor prints it.
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            http_client=DeadlineHttpClient(total_timeout=timeout, timeout=timeout),
        )
        self.base_url = str(self._client.base_url)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.response_format = response_format
        self.strict = strict
        self.temperature = temperature
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache
        # The first mode this server accepted, once one has ("auto" only).
        self._accepted_format: str | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, api_key='***', "
            f"response_format={self.response_format!r}, timeout={self.timeout!r}, max_retries={self.max_retries!r}, "
            f"cache_dir={str(self.cache_dir)!r})"
        )

    @property
    def accepted_response_format(self) -> str | None:
        """The response format this server last accepted (``response_format="auto"``); ``None`` before any answer."""
        return self._accepted_format

    # -- cache ------------------------------------------------------------------------------------

    def cache_key(self, messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any]) -> str:
        """SHA-256 of the request's content: model, messages, schema and temperature."""
        payload = {
            "model": self.model,
            "messages": [dict(message) for message in messages],
            "schema": schema,
            "temperature": self.temperature,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def _read_cache(self, key: str) -> dict[str, Any] | None:
        path = self.cache_path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring an unreadable LLM cache file %s (%s).", path, type(error).__name__)
            return None

    def _write_cache(self, key: str, response: dict[str, Any]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same folder and rename it: a reader (another process
        # working through the same prompt set) sees either no file or a complete one.
        handle, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"model": self.model, "response": response}, file, ensure_ascii=False)
            os.replace(temporary, self.cache_path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    # -- requests ---------------------------------------------------------------------------------

    def complete_json(
        self,
        messages: Sequence[Mapping[str, str]],
        schema: dict[str, Any],
        *,
        schema_name: str = "response",
        check: Callable[[dict[str, Any]], None] | None = None,
        use_cache: bool | None = None,
    ) -> dict[str, Any]:
        """Send ``messages`` and return the answer as a dict that matches ``schema``.

        Args:
            messages: chat messages (``{"role": ..., "content": ...}``).
            schema: JSON schema of the answer; its root must be an object.
            schema_name: the ``name`` of the ``json_schema`` response format.
            check: an extra test of the parsed answer; it raises ``ValueError`` to reject it. A rejected
                answer is neither returned nor cached, so asking again sends a new request.
            use_cache: overrides the client's ``use_cache`` for this call.

        Raises:
            LLMResponseError: the answer is not JSON, does not match ``schema`` or fails ``check``.
                Not retried here: whether to ask again is the caller's decision.
            LLMTimeoutError: no complete answer within ``timeout`` on any attempt.
            openai.APIError: the request failed (after the retries, for transient failures); a client
                error other than an unsupported response format (an unknown model, say) after one request.
        """
        use_cache = self.use_cache if use_cache is None else use_cache
        key = self.cache_key(messages, schema)
        if use_cache:
            cached = self._read_cache(key)
            if cached is not None:
                try:
                    self._validate(cached, schema, check, content=None)
                    logger.debug("LLM cache hit %s", key)
                    return cached
                except LLMResponseError:
                    logger.warning("Ignoring a cached LLM answer that no longer passes its checks (%s).", key)
        content = self._request(messages, schema, schema_name)
        answer = parse_json_object(content)
        self._validate(answer, schema, check, content)
        if use_cache:
            self._write_cache(key, answer)
        return answer

    @staticmethod
    def _validate(
        answer: dict[str, Any],
        schema: dict[str, Any],
        check: Callable[[dict[str, Any]], None] | None,
        content: str | None,
    ) -> None:
        try:
            validate_json(answer, schema)
        except SchemaValidationError as error:
            raise LLMResponseError(f"The answer does not match the schema: {error}", content) from None
        if check is not None:
            try:
                check(answer)
            except ValueError as error:
                raise LLMResponseError(f"The answer was rejected: {error}", content) from None

    def _request(self, messages: Sequence[Mapping[str, str]], schema: dict[str, Any], schema_name: str) -> str:
        """One answer's text, trying response formats in order when the server rejects one."""
        openai = import_openai()
        if self.response_format != "auto":
            formats = [self.response_format]
        else:
            start = RESPONSE_FORMATS.index(self._accepted_format) if self._accepted_format else 0
            formats = list(RESPONSE_FORMATS[start:])
        for index, response_format in enumerate(formats):
            try:
                content = self._request_with_retries(messages, schema, schema_name, response_format)
            except openai.APIStatusError as error:
                # Only a refused response format is worth another mode; any other 400 would fail in every
                # mode, so it is raised as it is, after one request, and what was accepted is unchanged.
                if is_format_unsupported(error) and index + 1 < len(formats):
                    logger.warning(
                        "The server rejected response_format %r (HTTP %d); trying %r.",
                        response_format,
                        error.status_code,
                        formats[index + 1],
                    )
                    continue
                raise
            if self.response_format == "auto":
                self._accepted_format = response_format
            return content
        raise AssertionError("unreachable")  # the last format either returns or raises

    def _request_with_retries(
        self, messages: Sequence[Mapping[str, str]], schema: dict[str, Any], schema_name: str, response_format: str
    ) -> str:
        arguments: dict[str, Any] = {"model": self.model, "messages": [dict(message) for message in messages]}
        if response_format == "json_schema":
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": self.strict},
            }
        else:
            # Without structured outputs the schema has to be in the conversation (json_object mode
            # also requires the word "JSON" to appear in it).
            arguments["messages"] = with_schema_instruction(arguments["messages"], schema)
            if response_format == "json_object":
                arguments["response_format"] = {"type": "json_object"}
        if self.temperature is not None:
            arguments["temperature"] = self.temperature
        openai = import_openai()
        for attempt in range(self.max_retries + 1):
            try:
                completion = self._client.chat.completions.create(**arguments)
                break
            except Exception as error:
                if attempt == self.max_retries and isinstance(error, openai.APITimeoutError):
                    raise LLMTimeoutError(
                        f"The LLM server sent no complete answer within timeout={self.timeout:g} s (a total limit "
                        f"per request, however slowly it sends), in {attempt + 1} attempt(s)."
                    ) from error
                if attempt == self.max_retries or not is_retryable(error):
                    raise
                delay = self._backoff(attempt, error)
                logger.warning(
                    "LLM request failed (%s); retry %d of %d in %.2f s.",
                    describe_error(error),
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        if not completion.choices:
            raise LLMResponseError("The server returned no choices.")
        message = completion.choices[0].message
        if getattr(message, "refusal", None):
            raise LLMResponseError(f"The model refused: {message.refusal}")
        if not message.content:
            raise LLMResponseError("The answer is empty.", message.content)
        return message.content

    def _backoff(self, attempt: int, error: BaseException) -> float:
        delay = self.initial_backoff * 2**attempt
        response = getattr(error, "response", None)
        retry_after = None
        if response is not None:
            # Retry-After in seconds (RFC 9110); OpenAI also sends retry-after-ms.
            for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
                try:
                    retry_after = float(response.headers[header]) * scale
                    break
                except (KeyError, TypeError, ValueError):
                    continue
        if retry_after is not None and retry_after >= 0:
            delay = retry_after
        return min(self.max_backoff, delay)


def check_timeout_and_retries(timeout: float, max_retries: int) -> None:
    """``ValueError`` unless ``timeout`` is a finite number of seconds > 0 and ``max_retries`` an integer >= 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}.")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}.")


def with_schema_instruction(messages: list[dict[str, str]], schema: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` with the schema stated in the system message (added first when there is none)."""
    instruction = SCHEMA_INSTRUCTION.format(schema=json.dumps(schema, ensure_ascii=False))
    messages = [dict(message) for message in messages]
    # Some chat templates accept a system message only in first position, so extend that one.
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}"
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages
