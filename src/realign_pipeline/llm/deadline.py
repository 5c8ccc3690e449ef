"""A total wall-clock limit per HTTP request, for the ``openai`` client.

httpx's timeouts apply to each network operation (connect, each read, each write), so a server that
sends one byte a second is never cut off by a 60 s read timeout: the LLM captioner would wait forever.
``DeadlineHttpClient`` is the ``openai`` client's own HTTP client (its defaults: redirects, limits,
proxies from the environment) plus a watchdog per request: a timer started when the request is sent
shuts the connection's socket down at the deadline, which ends a blocked read at once, and the request
then fails with a timeout that names the limit. ``openai`` reports it as ``APITimeoutError``.

The socket is found through httpcore's documented ``trace`` request extension (the ``connect_tcp`` and
``start_tls`` events return the network stream). Connections are therefore not kept alive between
requests: every request opens its own, so its watchdog always knows the socket to shut. That costs a
TCP (and TLS) handshake per request, small next to an LLM's answer.

This module imports ``openai`` and ``httpx2`` (openai's HTTP library) at import time; it is imported only
by ``JsonChatClient``, after the optional ``openai`` dependency was found.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx2
import openai

# Trace events (httpcore "trace" extension) whose return value is the connection's network stream.
STREAM_EVENTS = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")


class SocketWatchdog:
    """Shut a request's socket down ``seconds`` after ``start()``, unless ``cancel()`` comes first.

    ``trace`` is the callback for the request's ``trace`` extension: it records the socket of each new
    connection (and of its TLS layer, which replaces the plain socket). A socket found after the
    deadline is shut at once, so a slow connect cannot slip past it.
    """

    def __init__(self, seconds: float, previous_trace: Callable[[str, dict[str, Any]], Any] | None = None) -> None:
        self.seconds = seconds
        self.fired = False
        self._previous_trace = previous_trace
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if self._previous_trace is not None:
            self._previous_trace(name, info)
        if not name.endswith(STREAM_EVENTS):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._socket = sock
            fired = self.fired
        if fired:
            shut_down(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._socket
        if sock is not None:
            shut_down(sock)


def shut_down(sock: socket.socket) -> None:
    """``shutdown(SHUT_RDWR)``: unlike ``close()``, it wakes a read blocked on the socket in another thread."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the request ended on its own


class DeadlineHttpClient(openai.DefaultHttpxClient):
    """``openai.DefaultHttpxClient`` whose every (non-streamed) request ends within ``total_timeout`` seconds.

    Args:
        total_timeout: seconds from sending a request to having read its whole response, redirects included.
        **kwargs: as for ``openai.DefaultHttpxClient``, except ``limits``: no connection is kept alive
            (see the module docstring).
    """

    def __init__(self, *, total_timeout: float, **kwargs: Any) -> None:
        if not (isinstance(total_timeout, (int, float)) and 0 < total_timeout < float("inf")):
            raise ValueError(f"total_timeout must be a finite number of seconds > 0, got {total_timeout!r}.")
        kwargs["limits"] = httpx2.Limits(max_connections=1000, max_keepalive_connections=0)
        super().__init__(**kwargs)
        self.total_timeout = float(total_timeout)

    def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        if kwargs.get("stream"):
            # A streamed body is read after send() returns, beyond this watchdog; JsonChatClient never streams.
            return super().send(request, **kwargs)
        watchdog = SocketWatchdog(self.total_timeout, request.extensions.get("trace"))
        request.extensions["trace"] = watchdog.trace
        watchdog.start()
        try:
            return super().send(request, **kwargs)
        except httpx2.TransportError as error:
            if watchdog.fired:
                # The shut socket surfaces as a disconnect or a read error; say what really happened.
                raise httpx2.ReadTimeout(
                    f"No complete response within the total timeout of {self.total_timeout:g} s.", request=request
                ) from error
            raise
        finally:
            watchdog.cancel()
