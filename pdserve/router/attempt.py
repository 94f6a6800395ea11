"""One attempt of a client request: both legs at once, decode's answer back to the client
(router process). Raises LegError while nothing was sent, so the caller may retry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from pdserve import aio
from pdserve.router.body import (
    COMPLETIONS,
    GENERATE,
    abort_rids,
    encode_bodies,
    local_prefill_body,
    plain_body,
)
from pdserve.router.http_client import Response as LegResponse
from pdserve.router.http_server import ROUTER_SHUTTING_DOWN, Request, Response, StreamResponse
from pdserve.router.kv_policy import output_budget
from pdserve.router.legs import (
    LegContext,
    LegError,
    LegResult,
    classify,
    post,
    read_first_events,
    read_whole,
    request_id_head,
    stream_event_error,
    unless_failed,
)
from pdserve.router.merge import (
    EchoStreamMerger,
    SSEBuffer,
    StreamMerger,
    event_json,
    merge_echo_response,
    merge_response,
    prefill_echo_logprobs,
    prefill_prompt_fields,
    sse_event,
)
from pdserve.router.pairing import Pair
from pdserve.router.workers import Worker
from pdserve.serving.hooks import error_object
from pdserve.serving.request_id import REQUEST_ID_HEADER

T = TypeVar("T")
# The last event of a stream. Once it is forwarded the client has the whole answer and may
# hang up at once (OpenAI clients and `pdserve bench` do), possibly before decode's end of
# body comes: the client's answer ends there, and decode's connection drops the rest.
DONE_EVENT = b"data: [DONE]\n\n"
# A stream the router's stop ends (http_server.ROUTER_SHUTTING_DOWN): as a server ends one
# its own drain ends, an error event, then the last event.
STOP_TAIL = sse_event({"error": error_object(503, ROUTER_SHUTTING_DOWN)}) + DONE_EVENT
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class Attempt:
    def __init__(
        self,
        legs: LegContext,
        request: Request,
        route: str,
        body: dict[str, Any],
        pair: Pair,
        prompt_tokens: int,
        request_id: str,
    ):
        self.legs = legs
        self.request = request
        # The client request's correlation id: on both legs, their aborts and the answer.
        self.request_id = request_id
        self.id_head = request_id_head(request_id)
        self.route = route
        self.body = body
        self.raw = request.body  # the client's bytes, which decode to `body`
        self.pair = pair
        self.prompt_tokens = prompt_tokens
        # A leg loads its rank with the prompt tokens it makes it compute or receive (those
        # kv_aware saw cached cost next to nothing; other policies match none), and a decode
        # leg with the tokens it may generate there.
        self.prefill_compute_tokens = max(prompt_tokens - pair.prefill_matched_tokens, 0)
        decode_received = max(prompt_tokens - pair.decode_matched_tokens, 0)
        self.decode_load_tokens = decode_received + output_budget(body)
        self.stream = bool(body.get("stream"))
        self.want_merge = wants_prompt_logprobs(route, body)
        self.prefill_task: asyncio.Task[LegResult] | None = None
        self.decode_resp: LegResponse | None = None
        # The decode leg's own time, for the added-latency metric: set once the leg ended
        # well (a stream that failed or lost its client took the router nothing extra).
        self.decode_s: float | None = None
        self._decode_started = 0.0
        self._decode_done = False

    @property
    def decode(self) -> Worker:
        return self.pair.decode

    async def run(self) -> Response | StreamResponse:
        plan, prefill_data = self.pair.plan, b""
        if self.pair.local_prefill:
            decode_data = local_prefill_body(self.raw, self.body, self.pair.decode_rank)
        elif plan is not None:
            prefill_data, decode_data = encode_bodies(self.raw, self.body, plan)
        else:  # a plain worker: the client's body, with the rank kv_aware chose
            decode_data = plain_body(self.raw, self.body, self.pair.decode_rank)
        now = time.monotonic()
        if self.pair.prefill is not None:
            self.pair.prefill.on_dispatch(
                now, self.prompt_tokens, self.pair.prefill_rank, self.prefill_compute_tokens
            )
            self.prefill_task = asyncio.create_task(self._prefill_leg(prefill_data))
            # Its failure is handled through `unless_failed` or deliberately ignored once
            # decode has answered; never leave it "unretrieved".
            self.prefill_task.add_done_callback(_consume)
        self.decode.on_dispatch(
            now, self.prompt_tokens, self.pair.decode_rank, self.decode_load_tokens
        )
        self.legs.count_leg(self.decode)
        self._decode_started = time.perf_counter()
        try:
            # One watched coroutine per attempt: opening and reading decode's answer up to
            # the point of no return, so a prefill failure stops it at any step.
            if self.stream:
                buf = SSEBuffer()
                first = await self._unless_prefill_failed(self._open_stream(decode_data, buf))
                return await self._stream(first, buf)
            result = await self._unless_prefill_failed(self._read_decode(decode_data))
            return await self._whole(result)
        except LegError as err:
            self._fail(err)
            raise
        except BaseException:  # the client went away (handler cancelled) or a bug
            self._abandon("client_disconnect")
            raise

    async def _unless_prefill_failed(self, decode_leg: Awaitable[T]) -> T:
        """Decode's leg up to the point of no return, ended at once by a prefill failure.
        The router's deadline ending the prefill leg first ends decode's too (both run
        from the same moment): the prefill leg waits for decode's page list, which a frozen
        decode worker never sends, so that is decode not answering, and the client read
        `prefill server failed` for it. (A stuck prefill shows on decode first, as an error
        marked `origin: prefill`: its heartbeat or KV wait.)"""
        try:
            return await unless_failed(decode_leg, self.prefill_task)
        except LegError as err:
            if err.worker is self.decode or err.reason != "timeout":
                raise
            raise LegError(self.decode, 504, err.message, "timeout", False) from None

    async def _post_decode(self, data: bytes) -> LegResponse:
        legs = self.legs
        self.decode_resp = await post(
            legs.client, self.decode, self.route, data, legs.leg_timeout_s, self.id_head
        )
        return self.decode_resp

    async def _read_decode(self, data: bytes) -> LegResult:
        return await read_whole(self.decode, await self._post_decode(data), False)

    async def _open_stream(self, data: bytes, buf: SSEBuffer) -> list[bytes]:
        """Decode's first whole events (the point of no return)."""
        return await read_first_events(self.decode, await self._post_decode(data), buf)

    async def _prefill_leg(self, data: bytes) -> LegResult:
        worker = self.pair.prefill
        assert worker is not None
        self.legs.count_leg(worker)
        ok: bool | None = None
        try:
            timeout_s = self.legs.leg_timeout_s
            resp = await post(self.legs.client, worker, self.route, data, timeout_s, self.id_head)
            result = await read_whole(worker, resp, streamed=self.stream)
            ok = True
            return result
        except LegError as err:
            # No verdict on a refused request, nor on our own deadline ending the leg: a
            # prefill leg waits for decode's page list (a frozen decode worker's never
            # comes), and counting those opened a sound prefill server's breaker. A frozen
            # prefill server fails /health instead.
            ok = None if err.no_verdict or err.reason == "timeout" else False
            self.legs.count_leg_failure(err)
            raise
        finally:
            worker.on_done(
                time.monotonic(), ok, self.pair.prefill_rank, self.prefill_compute_tokens
            )

    async def _prefill_result(self) -> LegResult | None:
        """Prefill's whole answer (for its prompt logprobs), within the request deadline."""
        task, worker = self.prefill_task, self.pair.prefill
        if task is None or worker is None:
            return None
        try:
            return await aio.wait_for(asyncio.shield(task), self.legs.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise LegError(
                worker, 504, "no answer before the request deadline", "timeout", False
            ) from None

    async def _whole(self, result: LegResult) -> Response:
        self.decode_s = time.perf_counter() - self._decode_started
        body = result.body
        if self.want_merge:
            prefill = await self._prefill_result()
            if prefill is not None and self.route == GENERATE:
                body = merge_response(body, prefill_prompt_fields(prefill.body, prefill.streamed))
            elif prefill is not None:
                body = merge_echo_response(
                    body, prefill_echo_logprobs(prefill.body, prefill.streamed)
                )
        self._decode_finished(ok=True)
        return Response(body)  # the caller adds the X-Request-Id header

    async def _stream(self, first: list[bytes], buf: SSEBuffer) -> StreamResponse:
        resp = self.decode_resp
        assert resp is not None
        merger: StreamMerger | EchoStreamMerger | None = None
        if self.want_merge:
            prefill = await self._prefill_result()
            if prefill is not None and self.route == GENERATE:
                merger = StreamMerger(prefill_prompt_fields(prefill.body, prefill.streamed))
            elif prefill is not None:
                merger = EchoStreamMerger(prefill_echo_logprobs(prefill.body, prefill.streamed))
        out = StreamResponse(200, {**SSE_HEADERS, REQUEST_ID_HEADER: self.request_id})
        out.stop_tail = STOP_TAIL
        try:
            await out.prepare(self.request)  # committed: no retry from here on
            head = b"".join(merger.process(e) if merger else e for e in first)
            await self._pump(resp, out, head if merger else head + buf.rest(), buf, merger)
        except ConnectionResetError:  # the client hung up, seen by a write before the cancel
            self._abandon("client_disconnect")
            self.legs.count_failure(self.route, "client_disconnect")  # as a cancel counts it
        return out

    async def _pump(
        self,
        resp: LegResponse,
        out: StreamResponse,
        data: bytes,
        buf: SSEBuffer,
        merger: StreamMerger | EchoStreamMerger | None,
    ) -> None:
        """Forward `data`, then decode's bytes as they arrive, up to and including the last
        event. A decode failure now ends the client's stream with an error event (there is
        nothing left to retry)."""
        tail = b""
        failed: LegError | None = None
        while True:
            if data:
                failed = failed or self._error_event(data)
                await out.write(data)
                tail = data if len(data) >= len(DONE_EVENT) else (tail + data)[-len(DONE_EVENT) :]
                if tail.endswith(DONE_EVENT):
                    break
            if resp.at_end():
                break
            try:
                data = await resp.read_chunk()
            except Exception as exc:  # noqa: BLE001
                err = classify(self.decode, exc)
                self._fail(err)
                self.legs.count_failure(self.route, err.reason)
                await out.write(sse_event({"error": err.to_json()}))
                return
            if merger is not None:
                data = b"".join(merger.process(e) for e in buf.feed(data))
        self.decode_s = time.perf_counter() - self._decode_started
        if merger is not None and buf.rest():
            await out.write(buf.rest())
        # No await between the client getting the last event and the answer ending here, so
        # a client that hangs up then cannot cancel a finished request.
        self._decode_finished(ok=True if failed is None else self._decode_verdict(failed))
        await out.write_eof()

    def _error_event(self, data: bytes) -> LegError | None:
        """Decode's own error event among bytes forwarded past the point of no return (a
        worker that exited mid-stream): the client gets it as it came, and decode its
        verdict. It counted as a success on decode's breaker. An event split across two
        reads is not seen (an error event is one small write)."""
        if b'"error"' not in data:  # as read_whole: parse only when one may be an error
            return None
        for event in SSEBuffer().feed(data):
            err = stream_event_error(self.decode, event_json(event))
            if err is not None:
                self.legs.count_leg_failure(err)
                self.legs.count_failure(self.route, err.reason)
                return err
        return None

    def _decode_finished(self, ok: bool | None) -> None:
        if self._decode_done:
            return
        self._decode_done = True
        resp = self.decode_resp
        if resp is not None and ok:
            resp.discard_rest()  # keep-alive: the connection goes back to the pool
        elif resp is not None:
            resp.close()  # the server sees the router leave
        self.decode.on_done(time.monotonic(), ok, self.pair.decode_rank, self.decode_load_tokens)
        if self.prefill_task is not None and not self.prefill_task.done():
            if ok:  # prefill's answer no longer matters; let it end on its own
                self.legs.keep(self.prefill_task)

    def _fail(self, err: LegError) -> None:
        """A leg failed: stop the other one at once."""
        if err.worker is self.decode:
            self.legs.count_leg_failure(err)
            self._decode_finished(ok=self._decode_verdict(err))
            self._abort_prefill("decode_failed")
        else:
            self._decode_finished(ok=None)
            self._abort_decode("prefill_failed")

    def _decode_verdict(self, err: LegError) -> bool | None:
        """False (the decode server failed), or None (no verdict on it). A refused request,
        a 504, or an error decode marks as its prefill peer's (`LegError.no_verdict`: a
        room prefill failed, a lost or restarted prefill worker) says nothing of decode:
        counting those opened the breaker of a sound decode server, which then took no
        request for its open period. Nor does the router's own deadline, streamed or not:
        a whole answer longer than --request-timeout-s is one decode was still computing.
        Its own faults still count: an unmarked 5xx, a dropped connection."""
        if err.no_verdict or err.reason == "timeout":
            return None
        return False

    def _abandon(self, cause: str) -> None:
        if not self._decode_done:
            self._decode_finished(ok=None)
            self._abort_decode(cause)
        self._abort_prefill(cause)

    def _abort_prefill(self, cause: str) -> None:
        task, worker = self.prefill_task, self.pair.prefill
        if task is None or worker is None or task.done():
            return
        task.cancel()  # closes the connection: the server sees the client leave
        self.legs.abort_leg(worker, self._rids(), cause, self.request_id)

    def _abort_decode(self, cause: str) -> None:
        self.legs.abort_leg(self.decode, self._rids(), cause, self.request_id)

    def _rids(self) -> list[tuple[str, int]]:
        """(rid, room) of each sequence of the legs: a server aborts a rid only as the leg
        of that room, so a client's own `rid` that another request holds there (which this
        leg's server then refused) does not stop that other request."""
        plan = self.pair.plan
        if plan is None:
            return []
        rids = abort_rids(self.route, plan.rid, plan.num_seqs)
        # A client's rid list of another length than the batch: the server refuses it.
        return list(zip(rids, plan.rooms, strict=False))


def wants_prompt_logprobs(route: str, body: dict[str, Any]) -> bool:
    """Whether decode's answer needs the prompt logprobs only the prefill server computed."""
    if route == GENERATE:
        return bool(body.get("return_logprob"))
    return route == COMPLETIONS and bool(body.get("echo")) and body.get("logprobs") is not None


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
