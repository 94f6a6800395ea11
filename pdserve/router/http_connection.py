"""One connection of the router's HTTP client to a worker (router process): writes a request,
parses the answer as its bytes arrive (`http_parse.py`), keeps the deadline, and tells its
pool when it can carry the next request. The failures a call can end with are defined here."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from pdserve.router.http_parse import AnswerParser, ParseError

# Unread body bytes above which the connection stops reading (the server then waits).
READ_HIGH_WATER = 256 * 1024


class HttpError(Exception):
    """A call that got no complete answer."""


class ConnectFailed(HttpError):
    def __init__(self, os_error: OSError):
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(HttpError):
    pass


class ResponseTimeout(HttpError):
    """The deadline passed before the whole answer arrived."""


class ConnectionLost(HttpError):
    """The connection closed or broke before the answer ended."""


class BadResponse(HttpError):
    """Bytes that are not an HTTP/1.x answer."""


class WriteFlow(asyncio.Protocol):
    """Write flow control shared by the client and server connections: `writable()` waits
    while the transport's buffer is over its high-water mark (the peer reads slower than we
    write). A subclass's connection_lost must call resume_writing() to release a waiter."""

    _write_paused: asyncio.Future | None = None

    async def writable(self) -> None:
        if self._write_paused is not None:
            await self._write_paused

    def pause_writing(self) -> None:  # asyncio: the transport's buffer passed its high-water mark
        if self._write_paused is None:
            self._write_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:  # asyncio: under the low-water mark again (or lost)
        if self._write_paused is not None:
            if not self._write_paused.done():
                self._write_paused.set_result(None)
            self._write_paused = None


class Owner(Protocol):
    """Who keeps a worker's connections (the client's pool)."""

    def put_back(self, conn: Connection) -> None:
        """The answer was read whole: the connection may carry another request."""

    def forget(self, conn: Connection) -> None:
        """The connection closed."""


class Connection(WriteFlow):
    """One TCP connection, one request at a time; parses the answer as bytes arrive."""

    def __init__(self, pool: Owner):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.in_flight = False  # a request was sent and its caller has not finished with it
        self.answer = AnswerParser()
        self.error: HttpError | None = None
        self._body: list[bytes] = []  # received, not yet taken
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._discarding = False  # the caller is done: drop the rest of the body, then reuse

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            self.close()  # bytes nobody asked for: the framing cannot be trusted
            return
        if self.error is not None:
            return
        try:
            pieces = self.answer.feed(data)
        except ParseError as exc:
            self._fail(BadResponse(str(exc)))
            if self.transport is not None:
                self.transport.close()
        else:
            if pieces and not self._discarding:
                self._add(pieces)
            if self.answer.body_done:
                self._stop_timer()
                if self._discarding:
                    self._discarding = False
                    self.finish()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.transport = None
        self.resume_writing()  # a send() waiting for the buffer to drain goes on to wait()
        if not self.in_flight or self.error is not None or self.answer.body_done:
            return
        if exc is None and self.answer.end_of_input():
            self._stop_timer()
        elif not self.answer.head_done:
            self._fail(ConnectionLost(f"closed before the answer's head ({exc or 'EOF'})"))
        else:
            self._fail(ConnectionLost(f"closed in the middle of the body ({exc or 'EOF'})"))
        self._wake()

    # -- the request's side ------------------------------------------------------------

    def _add(self, pieces: list[bytes]) -> None:
        self._body += pieces
        self._buffered += sum(map(len, pieces))
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def _fail(self, error: HttpError) -> None:
        if self.error is None and not self.answer.body_done:
            self.error = error
            self._stop_timer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(ResponseTimeout("no whole answer before the deadline"))
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    async def send(self, data: bytes, deadline: float) -> None:
        """Write one request and arm its deadline (whole answer included)."""
        assert self.transport is not None
        self.in_flight = True
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timeout)
        self.transport.write(data)
        await self.writable()

    async def wait(self) -> None:
        """Until more of the answer (or its end) is there; raises what went wrong."""
        if self.error is not None:
            raise self.error
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def has_body(self) -> bool:
        return bool(self._body)

    def take_body(self) -> bytes:
        """The body bytes received and not yet taken."""
        body, self._body, self._buffered = self._body, [], 0
        return body[0] if len(body) == 1 else b"".join(body)

    def discard_rest(self) -> None:
        """The caller needs no more of the body: drop what is buffered and what still comes,
        and go back to the pool at the end of the answer (the deadline still holds; the
        connection closes if the answer breaks)."""
        self._body, self._buffered = [], 0
        if self.answer.body_done or self.error is not None or self.transport is None:
            self.finish()
            return
        self._discarding = True
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def finish(self) -> None:
        """The caller is done with the answer: back to the pool if the whole answer was read
        and the connection may be reused, else closed."""
        if not self.in_flight:
            return
        reusable = (
            self.answer.body_done
            and self.answer.keep_alive
            and not self._body
            and self.transport is not None
            and not self.transport.is_closing()
        )
        if not reusable:
            self.close()
            return
        self.in_flight = False
        self.answer = AnswerParser()
        self.pool.put_back(self)

    def close(self) -> None:
        """Drop the connection (the server sees the router leave); ends any request on it."""
        self.in_flight = False
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()
