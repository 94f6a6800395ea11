"""Server-sent events for streaming routes. Runs in the front end.

The first event is computed before the response starts, so a request that fails at dispatch
(bad rank, room conflict, worker gone) still gets a real HTTP status instead of a 200 stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from pdserve.serving.hooks import RequestError, error_object

logger = logging.getLogger(__name__)


# Every chunk of every stream is encoded here: msgspec takes 1-3 us where json.dumps took
# 17-49 (an OpenAI delta; a /generate chunk, whose output_ids grow with the answer).
_encode_json = msgspec.json.Encoder().encode


def _event(payload: Any) -> bytes:
    return b"data: " + _encode_json(payload) + b"\n\n"


async def sse_response(request: web.Request, events: AsyncIterator[Any]) -> web.StreamResponse:
    """Streams `events` as `data: {...}` lines ending with `data: [DONE]`. If the client goes
    away, closing `events` aborts the work behind it."""
    async with contextlib.aclosing(events):
        first = await anext(events, None)  # RequestError here becomes an HTTP error status
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(_event(first))
            async for payload in events:
                await response.write(_event(payload))
        except RequestError as exc:
            await response.write(_event({"error": exc.to_json()}))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the status line is gone: the error travels as an event
            logger.exception("stream failed")
            await response.write(_event({"error": error_object(500, f"internal error: {exc!r}")}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response
