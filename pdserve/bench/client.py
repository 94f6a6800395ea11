"""The HTTP shell of `pdserve bench`: one streamed request timed into a RequestRecord, and
the server look-ups a run needs (model info, model name, Prometheus text). aiohttp, in the
benchmark client process; parsing lives in `streams.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.streams import LineSplitter, StreamEvent, StreamParser, sse_data

LOOKUP_TIMEOUT_S = 10.0


def _fail(record: RequestRecord, kind: str, message: str) -> None:
    record.ok = False
    record.error_kind = kind
    record.error = message[:1000]


def _error_text(raw: str) -> str:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return raw
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])
    return raw


class _Timing:
    """Token arrival times of one request, in perf_counter seconds."""

    def __init__(self, sent: float):
        self.sent = sent
        self.last_token: float | None = None
        self.finished = False
        self.done = False
        self.token_chunks = 0

    @staticmethod
    def _keep_answer(record: RequestRecord, event: StreamEvent) -> None:
        """Native chunks carry the answer so far; OpenAI chunks carry a piece of text."""
        if event.output_ids is not None:
            record.output_ids = event.output_ids
            record.output_text = event.text
            if event.top_logprobs is not None:
                record.output_top_logprobs = event.top_logprobs
        elif event.text is not None:
            record.output_text = (record.output_text or "") + event.text

    def apply(self, record: RequestRecord, event: StreamEvent, now: float) -> None:
        if event.completion_tokens is not None:
            record.output_tokens = event.completion_tokens
            record.output_tokens_from_server = True
        if event.prompt_tokens is not None:
            record.prompt_len = event.prompt_tokens
        if event.cached_tokens is not None:
            record.cached_tokens = event.cached_tokens
        self._keep_answer(record, event)
        # an answer that is EOS alone comes as one finishing chunk with no text: its token
        first_and_last = event.finished and self.last_token is None
        self.finished = self.finished or event.finished
        if not (event.has_new_tokens or first_and_last):
            return
        if self.last_token is None:
            record.ttft_s = now - self.sent
        else:
            record.itl_s.append(now - self.last_token)
        self.last_token = now
        self.token_chunks += 1


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's lines as they arrive, the last one also when no newline ends it."""
    splitter = LineSplitter()
    async for data in resp.content.iter_any():
        for line in splitter.feed(data):
            yield line
    for line in splitter.flush():
        yield line


async def _read_stream(
    resp: aiohttp.ClientResponse, parser: StreamParser, record: RequestRecord, timing: _Timing
) -> None:
    async for line in _lines(resp):
        payload = sse_data(line)
        if payload is None:
            continue
        if payload == "[DONE]":
            timing.done = True
            return
        event = parser.feed(payload)
        if event.error is not None:
            _fail(record, "stream_error", event.error)
            return
        timing.apply(record, event, time.perf_counter())


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    endpoint: str,
    body: dict[str, Any],
    record: RequestRecord,
    start: float,
    timeout_s: float,
) -> None:
    """Send one streaming request and fill `record` (times relative to `start`, a
    perf_counter reading). Every failure lands in the record with its reason; none raises."""
    timing = _Timing(time.perf_counter())
    record.sent_s = timing.sent - start
    record.ok = True
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url, json=body, timeout=timeout) as resp:
            if resp.status != 200:
                _fail(record, f"http_{resp.status}", _error_text(await resp.text()))
                return
            await _read_stream(resp, StreamParser(endpoint), record, timing)
    except asyncio.TimeoutError:
        _fail(record, "timeout", f"no complete answer within {timeout_s} s")
    except aiohttp.ClientError as exc:
        _fail(record, "connection", f"{type(exc).__name__}: {exc}")
    except ValueError as exc:  # a stream item that is not JSON
        _fail(record, "bad_stream", str(exc))
    if not record.ok:
        return
    if not (timing.done or timing.finished) or timing.last_token is None:
        _fail(record, "incomplete_stream", "the stream ended before the answer was complete")
        return
    record.e2el_s = time.perf_counter() - timing.sent
    if not record.output_tokens_from_server:
        record.output_tokens = timing.token_chunks


async def unreachable(session: aiohttp.ClientSession, url: str) -> str | None:
    """Why GET `url` got no HTTP answer at all (refused, no such host, silent), or None when
    it got one, whatever its status."""
    try:
        timeout = aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT_S)
        async with session.get(url, timeout=timeout):
            return None
    except asyncio.TimeoutError:
        return f"no answer within {LOOKUP_TIMEOUT_S:g} s"
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__}: {exc}"


async def get_json(session: aiohttp.ClientSession, url: str) -> Any | None:
    """GET `url` as JSON, or None when it is missing, slow or not JSON."""
    try:
        timeout = aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    return (await fetch_text(session, url))[0]


async def fetch_text(session: aiohttp.ClientSession, url: str) -> tuple[str | None, str | None]:
    """GET `url` as text: (text, None), or (None, why not) when it is missing or slow."""
    try:
        timeout = aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                return None, f"HTTP {resp.status} {resp.reason}"
            return await resp.text(), None
    except asyncio.TimeoutError:
        return None, f"no answer within {LOOKUP_TIMEOUT_S:g} s"
    except aiohttp.ClientError as exc:
        return None, f"{type(exc).__name__}: {exc}"


async def served_model_name(session: aiohttp.ClientSession, base_url: str) -> str | None:
    """The first model id of `/v1/models`, which OpenAI routes expect in `model`."""
    listing = await get_json(session, base_url + "/v1/models")
    data = listing.get("data") if isinstance(listing, dict) else None
    first = data[0] if isinstance(data, list) and data else None
    model = first.get("id") if isinstance(first, dict) else None
    return model if isinstance(model, str) and model else None  # never "None" as a name
