"""A small HTTP/1.1 server for the router's own endpoints (router process): keep-alive,
pipelined requests answered in order, whole answers and chunked streams. A client that hangs
up cancels its handler, which aborts both legs. Parsing is in `http_parse.py` (llhttp)."""

from __future__ import annotations

import asyncio
import collections
import email.utils
import http
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from pdserve.cors import answer_headers, is_preflight, preflight_headers
from pdserve.router.http_connection import WriteFlow
from pdserve.router.http_parse import (
    HeadCheck,
    ParsedRequest,
    ParseError,
    Refused,
    RequestParser,
    find_header,
)
from pdserve.serving.hooks import error_object

log = logging.getLogger(__name__)
# Requests read ahead of the one being answered before the connection stops reading.
MAX_PIPELINED = 16
# A connection with nothing to answer is closed after this long without a whole request:
# idle keep-alive connections, and clients that send part of a request and stall (408).
IDLE_TIMEOUT_S = 75.0
# A client that takes none of an answer's bytes for this long is hung up on (nginx's
# send_timeout): a streaming client that stopped reading held its handler for good.
WRITE_STALL_S = 60.0
# The answer to a request still in progress when the router's stop ends it.
ROUTER_SHUTTING_DOWN = "the router is shutting down"


class Request:
    """One client request with its whole body."""

    __slots__ = (
        "method",
        "path",
        "query_string",
        "body",
        "http11",
        "cors_headers",
        "_parsed",
        "_conn",
    )

    def __init__(self, parsed: ParsedRequest, conn: ServerConnection):
        self.method = parsed.method
        self.path, _, self.query_string = parsed.target.partition("?")
        self.body = parsed.body
        self.http11 = parsed.http11
        # What every answer to it adds (CORS, for an allowed origin's page).
        self.cors_headers: dict[str, str] = {}
        self._parsed = parsed
        self._conn = conn

    def header(self, name: str) -> str | None:
        """The value of a header (the last, if repeated), or None."""
        value = find_header(self._parsed.headers, name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string))

    def json(self) -> Any:
        """The body as JSON; raises ValueError (msgspec.DecodeError) when it is not, or is
        nested too deeply to decode (msgspec's RecursionError)."""
        try:
            return msgspec.json.decode(self.body)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class Response:
    """A whole answer; `headers`, any beyond Content-Type and the framing."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers=headers)


class StreamResponse:
    """An answer written piece by piece: `prepare`, `write`..., `write_eof`. Chunked for
    HTTP/1.1 clients; for HTTP/1.0 ones the end of the connection ends it. The head goes out
    with the first piece, in one packet."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None):
        self.status = status
        self.finished = False  # write_eof() went out
        # What ends the stream when the router stops before it ends (an error event): the
        # client learns why, where a bare end of body read as a whole answer.
        self.stop_tail = b""
        self._headers = headers or {}
        self._conn: ServerConnection | None = None
        self._head = b""
        self._chunked = True

    @property
    def started(self) -> bool:
        """Its head went out: the status can no longer change."""
        return self._conn is not None and not self._head

    async def prepare(self, request: Request) -> None:
        self._conn = request._conn
        self._conn.stream = self
        self._chunked = request.http11
        headers = {**request.cors_headers, **self._headers}
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append("Transfer-Encoding: chunked\r\n" if self._chunked else "")
        self._head = _status_line(self.status) + f"{''.join(lines)}{_date_line()}\r\n".encode()

    async def write(self, data: bytes) -> None:
        if data:
            await self._send(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    async def write_eof(self) -> None:
        if not self.finished:
            await self._send(b"0\r\n\r\n" if self._chunked else b"")
            self.finished = True

    async def _send(self, data: bytes) -> None:
        assert self._conn is not None, "prepare() first"
        if self._head:
            data, self._head = self._head + data, b""
        await self._conn.write(data)


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True)
class HeadGuard:
    """Credentials checked on each request's head, before its body is read: `refusal()`
    answers a head `allows` refuses, and the connection closes (its body never read)."""

    allows: HeadCheck
    refusal: Callable[[], Response]


class HttpServer:
    """Routes by path, then method: `routes[path][method] = handler`; a path ending in
    `/*` takes every longer path that starts with what precedes the `*`."""

    def __init__(
        self,
        routes: dict[str, dict[str, Handler]],
        max_body_bytes: int,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        guard: HeadGuard | None = None,
        write_stall_s: float = WRITE_STALL_S,
        cors_origins: Sequence[str] = (),
    ):
        self.routes = routes
        self.cors_origins = cors_origins  # origins allowed to call it from a web page
        self.write_stall_s = write_stall_s
        self.guard = guard
        self._prefixed = [
            (path[:-1], methods) for path, methods in routes.items() if path[-2:] == "/*"
        ]
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), host, port, backlog=backlog
        )

    async def stop(self, grace_s: float, cut: asyncio.Event | None = None) -> None:
        """Stop accepting; give answers in progress `grace_s` to end (or until `cut` is
        set: a second signal), then answer the rest 503 `the router is shutting down` (a
        stream already started: its `stop_tail`) and hang up. Hung up on unanswered, a
        client read a dropped connection or a stream's bare end, with no cause."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            ends = [asyncio.ensure_future(asyncio.wait(busy))]
            if cut is not None:
                ends.append(asyncio.ensure_future(cut.wait()))
            await asyncio.wait(ends, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for end in ends:
                end.cancel()
        stopping = [c for c in self.connections if c.task is not None]
        for conn in stopping:
            conn.stop_answer()
        if stopping:  # the answers are small writes; a client that reads none is cut off
            await asyncio.wait([c.task for c in stopping if c.task is not None], timeout=1.0)
        for conn in list(self.connections):
            conn.hang_up()

    def handler(self, method: str, path: str) -> Handler:
        methods = self.routes.get(path)
        if methods is None:
            methods = next((m for p, m in self._prefixed if path.startswith(p) and path != p), None)
        if methods is None:
            return _error_handler(404, f"no route {path}")
        handler = methods.get("GET" if method == "HEAD" else method)  # HEAD: GET's head
        if handler is None:
            return _error_handler(405, f"{method} not allowed on {path}")
        return handler


class ServerConnection(WriteFlow):
    """One client connection: requests in, answers out in the same order, one at a time."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None  # answering the queue's requests
        guard = server.guard
        self._parser = RequestParser(server.max_body_bytes, guard.allows if guard else None)
        # Requests to answer in order; a ParseError last, answered before the close.
        self._queue: collections.deque[ParsedRequest | ParseError] = collections.deque()
        self._closing = False  # answer what is in progress, then close
        self._stopping = False  # the router stops: the handler's answer is a 503
        self.stream: StreamResponse | None = None  # the answer in progress, if a stream
        self._idle_timer: asyncio.TimerHandle | None = None  # runs while nothing is answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        self._stop_idle_timer()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.server.idle_timeout_s, self._idle_timeout)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.transport is None or self.task is not None:
            return
        if self._parser.partial:
            limit = self.server.idle_timeout_s
            error = _error(408, f"request not complete within {limit:g} s")
            self.transport.write(_encode(error, False))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._parser.error is not None:
            return
        self._queue += self._parser.feed(data)
        if self._parser.error is not None:
            # The framing of what follows is lost: answer what came before, then this.
            self._queue.append(self._parser.error)
            if self.transport is not None:
                self.transport.pause_reading()
        if self._parser.expects_continue and self.transport is not None:
            self._parser.expects_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._queue and self.task is None:
            self._stop_idle_timer()
            self.task = asyncio.get_running_loop().create_task(self._answer_queue())
        if len(self._queue) > MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_idle_timer()
        self.transport = None
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client is gone: its handler stops (and aborts its legs)
        self.resume_writing()

    async def write(self, data: bytes) -> None:
        """Write, waiting while the client reads slower than we write; one that takes
        nothing for `write_stall_s` meanwhile is cut off (ConnectionResetError)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client hung up")
        self.transport.write(data)
        if self._write_paused is not None:
            loop = asyncio.get_running_loop()
            stall = loop.call_later(self.server.write_stall_s, self.transport.abort)
            try:
                await self.writable()
            finally:
                stall.cancel()
        if self.transport is None:
            raise ConnectionResetError("the client hung up")

    def close_when_idle(self) -> None:
        self._closing = True
        if self.task is None:
            self.hang_up()

    def stop_answer(self) -> None:
        """End the handler at once; `_answer` answers in its stead."""
        self._stopping = True
        if self.task is not None:
            self.task.cancel()

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _answer_queue(self) -> None:
        try:
            while self._queue and self.transport is not None:
                parsed = self._queue.popleft()
                if isinstance(parsed, ParseError):
                    await self.write(_encode(self._refusal(parsed), False))
                    self.hang_up()
                    return
                if self.transport is not None and len(self._queue) == MAX_PIPELINED:
                    self.transport.resume_reading()
                keep_alive = await self._answer(parsed)
                if not keep_alive or self._closing:
                    self.hang_up()
                    return
        except asyncio.CancelledError:
            pass  # the client hung up
        except ConnectionError:
            self.hang_up()
        finally:
            self.task = None
            if self.transport is not None and not self.transport.is_closing():
                self._start_idle_timer()

    def _refusal(self, error: ParseError) -> Response:
        guard = self.server.guard
        if isinstance(error, Refused) and guard is not None:
            refusal = guard.refusal()
            cors = answer_headers(error.origin, self.server.cors_origins)
            if cors:  # the page may read its 401 (the head's other answers name no route)
                refusal.headers = {**cors, **(refusal.headers or {})}
            return refusal
        return _error(error.status, f"bad request: {error}")

    async def _answer(self, parsed: ParsedRequest) -> bool:
        """Run the handler and write its answer; whether the connection stays open."""
        request = Request(parsed, self)
        self.stream = None
        origin = request.header("Origin")
        if origin is not None and self.server.cors_origins:
            preflight = _preflight(request, origin, self.server.cors_origins)
            if preflight is not None:
                await self.write(_encode(preflight, parsed.keep_alive))
                return parsed.keep_alive
            request.cors_headers = answer_headers(origin, self.server.cors_origins)
        try:
            response = await self.server.handler(parsed.method, request.path)(request)
        except asyncio.CancelledError:
            if not self._stopping or self.transport is None:
                raise
            return await self._answer_stopped()
        except Exception as exc:  # a bug: still an answer in the router's error format
            log.exception("error answering %s %s", parsed.method, request.path)
            response = _error(500, f"router error: {exc!r}")
        if isinstance(response, StreamResponse):
            if response._conn is None:
                await response.prepare(request)
            await response.write_eof()  # if the handler did not
            return parsed.keep_alive and request.http11  # HTTP/1.0: the close ends the answer
        head_only = parsed.method == "HEAD"  # RFC 9110 9.3.2: GET's head, no content
        if request.cors_headers:  # (a handler's headers may be a shared constant: not edited)
            response.headers = {**request.cors_headers, **(response.headers or {})}
        await self.write(_encode(response, parsed.keep_alive, head_only))
        return parsed.keep_alive

    async def _answer_stopped(self) -> bool:
        """The answer of a request the router's stop ended: 503, or where a stream's head
        went out already, its `stop_tail` and its end."""
        stream = self.stream
        if stream is not None and stream.started:
            if not stream.finished:
                await stream.write(stream.stop_tail)
                await stream.write_eof()
        else:
            await self.write(_encode(_error(503, ROUTER_SHUTTING_DOWN), False))
        return False


def _preflight(request: Request, origin: str, allowed: Sequence[str]) -> Response | None:
    """The 200 answering a browser's preflight from an allowed origin, else None."""
    if not is_preflight(request.method, origin, request.header("Access-Control-Request-Method")):
        return None
    headers = preflight_headers(origin, request.header("Access-Control-Request-Headers"), allowed)
    return None if headers is None else Response(b"", 200, "text/plain", headers)


def _error(status: int, message: str) -> Response:
    return json_response({"error": error_object(status, message)}, status)


def _error_handler(status: int, message: str) -> Handler:
    async def answer(request: Request) -> Response:
        return _error(status, message)

    return answer


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


_date_cache: tuple[int, str] = (0, "")


def _date_line() -> str:
    """The Date header, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n")
    return _date_cache[1]


def _encode(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    body = response.body
    connection = "" if keep_alive else "Connection: close\r\n"
    extra = (
        "".join(f"{k}: {v}\r\n" for k, v in response.headers.items()) if response.headers else ""
    )
    head = (
        f"Content-Type: {response.content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}{connection}{_date_line()}\r\n"
    )
    return _status_line(response.status) + head.encode("latin-1") + (b"" if head_only else body)
