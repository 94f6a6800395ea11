"""Reading a request body bounded in size and time, for every aiohttp site of a server (its
HTTP API and, on prefill, the bootstrap server). Runs in the front-end process.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from pdserve import aio
from pdserve.serving.content_coding import decoded_body
from pdserve.serving.hooks import RequestError

logger = logging.getLogger(__name__)

CLIENT_LEFT_STATUS = 499  # nginx's "client closed request": nobody reads the answer
DECODED = web.RequestKey("pdserve.decoded_body", bytes)  # its body, decoded once


async def read_body(request: web.Request, max_nbytes: int, timeout_s: float) -> bytes:
    """The body, its Content-Encoding undone (the sites leave it coded: `auto_decompress`
    off), or a RequestError: 413 for a size over `max_nbytes`, declared or decoded (aiohttp
    checks its client_max_size only as the bytes arrive), 408 for a body not complete within
    `timeout_s` (one sent short), 400 for bytes that do not follow their Content-Encoding,
    415 for br or zstd, 499 for a client that left mid-body (one INFO line: a client event,
    not an error)."""
    decoded = request.get(DECODED)
    if decoded is None:
        raw = await _read_raw(request, max_nbytes, timeout_s)
        decoded = decoded_body(raw, request.headers.get("Content-Encoding"), max_nbytes)
        request[DECODED] = decoded
    return decoded


async def _read_raw(request: web.Request, max_nbytes: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > max_nbytes:
        raise RequestError(
            413, f"body of {request.content_length} bytes is over {max_nbytes} bytes"
        )
    try:
        # cached by aiohttp: later reads are free. aio.wait_for: a client that hangs up as
        # its body completes cancels the handler, never lets it go on (asyncio's can).
        return await aio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise RequestError(408, f"request body not complete within {timeout_s:g} s") from None
    except RequestPayloadError as exc:
        raise RequestError(400, f"unreadable body: {' '.join(str(exc).split())}") from None
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError too
        # A client event, not a server error: one line, and nothing was parsed or registered.
        # (A site without handler cancellation gets this; the HTTP API is cancelled instead.)
        _log_client_left(request, str(exc))
        raise RequestError(
            CLIENT_LEFT_STATUS, "the client left before its body was complete"
        ) from None
    except asyncio.CancelledError:
        if request.transport is None or request.transport.is_closing():
            _log_client_left(request, "connection closed")
        raise


def _log_client_left(request: web.Request, why: str) -> None:
    logger.info(
        "%s %s from %s: the client left before its body was complete (%d of %s bytes came): %s",
        request.method,
        request.path,
        request.remote,
        request.content.total_bytes,
        request.content_length,
        why,
    )
