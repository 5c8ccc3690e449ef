"""An OpenAI-compatible HTTP server for tests: ``POST /v1/chat/completions`` with scripted replies.

Tests go through the real ``openai`` client over real HTTP on 127.0.0.1 (a random free port), so
retries, timeouts, status codes and headers behave as they do against a real server. Each test
queues the replies it wants, in order, and afterwards reads what the server received::

    with OpenAIStub(api_key="sk-test") as server:
        server.push(chat_reply({"objects": []}), error_reply(429), slow_reply(chat_reply("{}"), 2.0))
        client = JsonChatClient(base_url=server.url, api_key="sk-test", ...)
        ...
        assert len(server.requests) == 3

Requests whose ``response_format`` type is in ``reject_response_formats`` get HTTP 400 (as a server
without structured outputs answers) without using up a queued reply. When the queue is empty the
server answers HTTP 400 "no scripted reply", which fails a test loudly instead of retrying.
``trickle_reply`` scripts a server that never finishes: one byte (of the body, or of the headers) per interval.

Import it as ``tests.servers.openai_stub`` (``tests`` is a package; pytest puts the repository root
on ``sys.path`` when it loads ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A recognisable fake key: tests assert that it never shows up in logs, reprs or exceptions.
STUB_API_KEY = "sk-stub-Zq8vN3kT0pLw5rYx"


@dataclass
class StubReply:
    """One scripted HTTP reply: a status, a JSON (dict) or raw (str) body, headers, and a delay before it."""

    status: int = 200
    body: dict[str, Any] | str = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Trickling (``trickle_reply``): one byte every ``trickle_interval`` seconds, in the body or the headers,
    # for ``trickle_duration`` seconds, then the connection closes with the reply unfinished.
    trickle_interval: float = 0.0
    trickle_phase: str = "body"
    trickle_duration: float = 0.0


def chat_reply(content: str | dict[str, Any] | list[Any], model: str = "stub-model") -> StubReply:
    """A successful chat completion whose message content is ``content`` (dicts and lists are JSON-encoded)."""
    text = content if isinstance(content, str) else json.dumps(content)
    return StubReply(
        body={
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def error_reply(
    status: int,
    message: str = "stub error",
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> StubReply:
    """An error in OpenAI's format, e.g. ``error_reply(429, headers={"retry-after": "0"})``."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
    kind = kinds.get(status, "rate_limit_error" if status == 429 else "api_error")
    return StubReply(
        status=status,
        body={"error": {"message": message, "type": kind, "param": param, "code": code}},
        headers=dict(headers or {}),
    )


def raw_error_reply(status: int, body: dict[str, Any]) -> StubReply:
    """An error whose JSON body is not OpenAI's shape, e.g. a FastAPI validation error (HTTP 422, ``detail``)."""
    return StubReply(status=status, body=body)


def trickle_reply(interval: float, phase: str = "body", duration: float = 10.0) -> StubReply:
    """A reply that never completes: one byte every ``interval`` seconds for ``duration`` seconds.

    ``phase="body"`` sends the status line and headers (announcing a long body), then the body one space
    at a time; ``phase="headers"`` sends the status line, then one header byte at a time. A client
    whose timeout applies per read never gives up on it before ``duration``; then the stub hangs up.
    """
    if phase not in ("body", "headers"):
        raise ValueError(f"phase must be 'body' or 'headers', got {phase!r}.")
    return StubReply(trickle_interval=interval, trickle_phase=phase, trickle_duration=duration)


def slow_reply(reply: StubReply, delay: float) -> StubReply:
    """``reply`` sent only after ``delay`` seconds (beyond a client's timeout, the client gives up first)."""
    return StubReply(status=reply.status, body=reply.body, headers=dict(reply.headers), delay=delay)


@dataclass
class StubRequest:
    """What the server received: the path, the JSON body, and the Authorization header's value."""

    path: str
    body: dict[str, Any]
    authorization: str | None

    @property
    def response_format(self) -> str | None:
        response_format = self.body.get("response_format")
        return response_format.get("type") if isinstance(response_format, dict) else None


class OpenAIStub:
    """A scripted OpenAI-compatible server on 127.0.0.1; use it as a context manager.

    Args:
        api_key: the key the server expects (``Authorization: Bearer <api_key>``); others get HTTP 401.
        reject_response_formats: ``response_format`` types answered with HTTP 400, e.g. ``{"json_schema"}``.
        responder: called with the request body when the queue is empty, for replies that depend on
            the request; ``None`` answers HTTP 400 then.
    """

    def __init__(
        self,
        api_key: str = STUB_API_KEY,
        reject_response_formats: Iterable[str] = (),
        responder: Callable[[dict[str, Any]], StubReply] | None = None,
    ) -> None:
        self.api_key = api_key
        self.reject_response_formats = set(reject_response_formats)
        self.responder = responder
        self.requests: list[StubRequest] = []
        self._replies: deque[StubReply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The ``base_url`` for an OpenAI client: ``http://127.0.0.1:<port>/v1``."""
        if self._server is None:
            raise RuntimeError("The stub server is not running.")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def push(self, *replies: StubReply) -> None:
        """Queue replies, served in order, one per request."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """Replies queued but not served yet."""
        with self._lock:
            return len(self._replies)

    def start(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_unparsed": raw.decode("utf-8", "replace")}
                request = StubRequest(self.path, body, self.headers.get("Authorization"))
                reply = stub._reply_for(request)
                if reply.trickle_interval > 0:
                    self._trickle(reply)
                    return
                if reply.delay:
                    stub._stopping.wait(reply.delay)
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = payload.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up before the (slow) reply

            def _trickle(self, reply: StubReply) -> None:
                # Unbuffered writes (wbufsize 0): each byte leaves at once, as from a stalling server.
                self.close_connection = True
                try:
                    if reply.trickle_phase == "body":
                        self.wfile.write(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
                        )
                        byte = b" "  # JSON whitespace
                    else:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Stub-Trickle: ")
                        byte = b"x"
                    deadline = time.monotonic() + reply.trickle_duration
                    while time.monotonic() < deadline and not stub._stopping.wait(reply.trickle_interval):
                        self.wfile.write(byte)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what a total timeout should do

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown (once per test) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="openai-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _reply_for(self, request: StubRequest) -> StubReply:
        with self._lock:
            self.requests.append(request)
            if request.path.rstrip("/") != "/v1/chat/completions":
                return error_reply(404, f"stub: no route {request.path}")
            if request.authorization != f"Bearer {self.api_key}":
                return error_reply(401, "stub: wrong or missing API key")
            if request.response_format in self.reject_response_formats:
                return error_reply(400, f"stub: response_format {request.response_format!r} is not supported")
            if self._replies:
                return self._replies.popleft()
        if self.responder is not None:
            return self.responder(request.body)
        return error_reply(400, "stub: no scripted reply left")
