"""A small keep-alive HTTP/1.1 client for the router's calls to its workers (router process):
a pool of connections per worker (`http_connection.py`); answers read whole or piece by
piece as they arrive. It does only what a leg needs, at a fraction of a general
client's CPU per request (docs/bench.md, "Router overhead")."""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

from pdserve import aio
from pdserve.router.http_connection import (
    BadResponse,
    ConnectFailed,
    Connection,
    ConnectionLost,
    ConnectTimeout,
    HttpError,
    ResponseTimeout,
)
from pdserve.router.http_parse import find_header

__all__ = [
    "BadResponse",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionLost",
    "HttpClient",
    "HttpError",
    "Pool",
    "Response",
    "ResponseTimeout",
]


class Response:
    """A worker's answer whose head has arrived. Read the body with `read()` or `read_chunk()`
    and hand the connection back with `release()` (or `close()` to drop it). Once released,
    the connection may carry another request: this object no longer touches it."""

    __slots__ = ("_conn", "status", "_headers")

    def __init__(self, conn: Connection):
        self._conn: Connection | None = conn
        self.status = conn.answer.status
        self._headers = conn.answer.headers

    def header(self, name: str) -> str | None:
        """The value of a header of the answer (the last, if repeated), or None."""
        value = find_header(self._headers, name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    def _connection(self) -> Connection:
        if self._conn is None:
            raise ConnectionLost("the answer was already released")
        return self._conn

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._connection()
        try:
            while not conn.answer.body_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return conn.take_body()

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" at the end."""
        conn = self._connection()
        try:
            while not conn.has_body() and not conn.answer.body_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return conn.take_body()

    def at_end(self) -> bool:
        """The whole body has come and was read."""
        conn = self._conn
        return conn is None or (conn.answer.body_done and not conn.has_body())

    def discard_rest(self) -> None:
        """Done with the body though it has not all come: the connection drops the rest as
        it arrives, then carries another request (no task waits for it)."""
        if self._conn is not None:
            self._conn.discard_rest()
            self._conn = None

    def release(self) -> None:
        if self._conn is not None:
            self._conn.finish()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Pool:
    """Keep-alive connections to one worker (base URL like http://host:port)."""

    def __init__(
        self, base_url: str, connect_timeout_s: float, keepalive_s: float, extra_head: bytes = b""
    ):
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._host_line = f"Host: {parts.netloc}\r\n".encode("latin-1") + extra_head
        self.retired = False  # its worker left: no connection goes back to it
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._heads: dict[tuple[str, str], bytes] = {}

    def head(self, method: str, path: str) -> bytes:
        """The start of a request's head, built once per method and path."""
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._host_line
            self._heads[key] = head
        return head

    async def connection(self, timeout_s: float) -> Connection:
        """A live idle connection (most recently used first), else a new one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            live = conn.transport is not None and not conn.transport.is_closing()
            if live and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            # aio.wait_for: a leg cancelled as its connection opens must not go on to send
            # its request (asyncio's lost the cancellation); the connection is closed.
            _, conn = await aio.wait_for(
                loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.ssl
                ),
                min(timeout_s, self.connect_timeout_s),
                on_dropped=lambda pair: pair[0].close(),
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout_s} s") from None
        except OSError as exc:
            raise ConnectFailed(exc) from exc
        self._all.add(conn)
        return conn

    def put_back(self, conn: Connection) -> None:
        if self.retired:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def take_idle(self) -> list[Connection]:
        idle, self._idle = self._idle, []
        return idle

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    @property
    def num_connections(self) -> int:
        return len(self._all)


class HttpClient:
    """One pool per worker base URL; every request carries `api_key` as a Bearer token."""

    def __init__(
        self, connect_timeout_s: float = 5.0, keepalive_s: float = 60.0, api_key: str | None = None
    ):
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._extra_head = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self._pools: dict[str, Pool] = {}

    def pool(self, base_url: str) -> Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = Pool(base_url, self.connect_timeout_s, self.keepalive_s, self._extra_head)
            self._pools[base_url] = pool
        return pool

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        timeout_s: float,
        body: bytes | None = None,
        extra_head: bytes = b"",
    ) -> Response:
        """Send one request, `extra_head` (whole header lines) in its head; returns once the
        answer's head is in. Raises HttpError."""
        pool = self.pool(base_url)
        deadline = asyncio.get_running_loop().time() + timeout_s
        conn = await pool.connection(timeout_s)
        head = pool.head(method, path) + extra_head
        if body is None:
            data = head + b"\r\n"
        else:
            length = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            data = head + length + body
        try:
            await conn.send(data, deadline)
            while not conn.answer.head_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Response(conn)

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """(status, whole body) of a GET."""
        resp = await self.request("GET", base_url, path, timeout_s)
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    async def post(
        self, base_url: str, path: str, body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        """(status, whole body) of a POST with a JSON `body`."""
        resp = await self.request("POST", base_url, path, timeout_s, body)
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    def drop(self, base_url: str) -> None:
        """A worker left: close its idle connections, and the others once their answer ends."""
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            pool.retired = True
            for conn in pool.take_idle():
                conn.close()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
