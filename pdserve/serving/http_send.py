"""A deadline on writing an answer to a client, for the server's HTTP API (nginx's
send_timeout). Runs in the front-end process.

aiohttp's writes wait while the client reads slower than they write, and for good: a client
that stays connected and reads nothing held its handler, its connection and its whole
answer in memory until it hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator

from aiohttp import web

from pdserve.serving.http_request_id import log_tag

logger = logging.getLogger(__name__)
SEND_TIMEOUT_S = web.AppKey("pdserve.send_timeout_s", float)


@contextlib.contextmanager
def send_deadline(request: web.Request) -> Iterator[None]:
    """Around one write: a client that takes none of its bytes for the app's send timeout
    is hung up on, which ends the write (ConnectionResetError) and cancels the handler."""
    transport = request.transport
    if transport is None:
        yield
        return
    timeout_s = request.app[SEND_TIMEOUT_S]
    timer = asyncio.get_running_loop().call_later(timeout_s, _hang_up, request, transport)
    try:
        yield
    finally:
        timer.cancel()


def _hang_up(request: web.Request, transport: asyncio.BaseTransport) -> None:
    """Close with a TCP reset: a plain close left the unsent answer in the kernel (a MiB or
    more) until the client read it or TCP gave up on it, minutes later."""
    logger.info(
        "%s %s from %s: hung up on the client: it read none of its answer for %g s%s",
        request.method,
        request.path,
        request.remote,
        request.app[SEND_TIMEOUT_S],
        log_tag(request),
    )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# A write of at most this many bytes into an empty transport buffer cannot wait (asyncio
# pauses a protocol past 64 KiB buffered), so it needs no deadline.
KEEPING_UP_NBYTES = 16384


async def write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """`response.write(data)` under the send deadline where it may wait: a timer per token
    cost about 10 us of the front end's time (its cancelled handles also fill the loop's
    heap), while a client that keeps up leaves the transport's buffer empty."""
    transport = request.transport
    if transport is not None and len(data) <= KEEPING_UP_NBYTES:
        if not transport.get_write_buffer_size():
            await response.write(data)
            return
    with send_deadline(request):
        await response.write(data)


@web.middleware
async def send_deadline_middleware(request: web.Request, handler) -> web.StreamResponse:
    """A whole answer (not a stream the handler wrote) is written here, under the deadline:
    aiohttp writes it after the handler with none. What it does after is then a no-op."""
    response = await handler(request)
    if response.prepared:
        return response
    try:
        with send_deadline(request):
            await response.prepare(request)
            await response.write_eof()
    except ConnectionError:  # aiohttp's own write after this one tells it the client left
        pass
    return response
