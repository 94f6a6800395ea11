"""Running one `GenItem` through a worker: dispatch, hooks, detokenization, metrics.

Runs in the front end (asyncio). `Generator.run` yields a `Delta` per worker message; a
consumer that stops early (client gone) or a deadline aborts the request in its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve import aio
from pdserve.engine.request import FinishReason
from pdserve.serving.detokenizer import IncrementalDetokenizer, direct_decoder
from pdserve.serving.dp_controller import DPController, InFlight
from pdserve.serving.hooks import SHUTTING_DOWN, FrontendHooks, RequestCancelled, RequestError
from pdserve.serving.protocol import DisaggInfo, GenerateReq, ReqOutput
from pdserve.serving.request_parse import GenItem

ClientGone = Callable[[], bool]


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


@dataclass
class ItemResult:
    """Everything known about one item so far; complete once `finish_reason` is set."""

    item: GenItem
    started_at: float
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[Any] | None = None
    cached_tokens: int = 0
    # disaggregation: KV bytes this server sent or received (None: no transfer reported)
    kv_transfer_bytes: int | None = None
    decode_cached_tokens: int = 0  # decode: prompt tokens it held, so not transferred
    finish_reason: FinishReason | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    # Set when another item of its request failed: this one then ends with that error, which
    # its room's other leg hears, rather than as a client that left ("cancelled").
    sibling_error: RequestError | None = None

    @property
    def e2e_latency_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at


class Generator:
    def __init__(
        self,
        controller: DPController,
        hooks: FrontendHooks,
        tokenizer: Any,
        mode: str,
        request_timeout_s: float,
    ):
        self.controller = controller
        self.hooks = hooks
        self.decoder = direct_decoder(tokenizer)  # the detokenizers' and logprobs' decode
        self.mode = mode
        self.request_timeout_s = request_timeout_s
        self.metrics = controller.metrics
        self.rooms_in_flight: set[int] = set()
        # Requests in the mode's hook, not yet with a worker (a decode leg resolving its
        # prefill rank): in flight for a drain, which ends them at its deadline (`stop`).
        self._preparing: set[asyncio.Future] = set()
        self._stopping = False

    async def run(
        self, item: GenItem, result: ItemResult, client_gone: ClientGone | None = None
    ) -> AsyncIterator[Delta]:
        """Yields deltas until the item finishes; raises RequestError on failure. A client
        that `client_gone` reports (checked per output) cancels the request."""
        try:
            req = await self._dispatch(item)
        except RequestError:
            self.metrics.requests.labels("rejected").inc()
            raise
        except asyncio.CancelledError:  # the client left while the mode's hook waited
            self.metrics.requests.labels("cancelled").inc()
            raise
        detok = IncrementalDetokenizer(
            self.decoder,
            item.sampling.skip_special_tokens,
            # A prefill leg ends once its KV has left, whatever its one token's text: decode
            # applies the stop strings (ending a prefill leg on one failed the decode leg).
            None if self.mode == "prefill" else item.sampling.stop,
            item.sampling.no_stop_trim,
            item.sampling.min_new_tokens,
        )
        error: RequestError | None = RequestCancelled()
        try:
            # Closed here, not when collected: its finally cancels the deadline timer.
            outputs = self._outputs(self.controller.inflight[req.rid], result)
            async with contextlib.aclosing(outputs):
                async for msg in outputs:
                    if client_gone is not None and client_gone():
                        return  # error stays "cancelled": the request is aborted in its worker
                    self.hooks.on_output(req, msg)
                    delta = self._apply(msg, detok, result)
                    if detok.matched_stop is not None and result.finish_reason is None:
                        result.finish_reason = FinishReason("stop", matched=detok.matched_stop)
                        self.controller.abort(req.rid, "stop string matched")
                    if result.finish_reason is not None:
                        delta.text += detok.finish()
                        result.text = detok.text[: detok.num_released]
                        if detok.matched_stop is not None:
                            # The text ends at this stop string: the answer's reason, as
                            # vLLM's, whatever the engine saw at the same token (the length
                            # limit, or another stop string the token completed).
                            result.finish_reason = FinishReason("stop", matched=detok.matched_stop)
                    yield delta
                    if result.finish_reason is not None:
                        error = None
                        return
        except RequestError as exc:
            error = exc
            raise
        finally:
            if isinstance(error, RequestCancelled) and result.sibling_error is not None:
                error = result.sibling_error
            self._close(req, result, error)

    async def _dispatch(self, item: GenItem) -> GenerateReq:
        pd = item.pd
        rank = self.controller.choose_rank(pd.room, pd.routed_dp_rank)
        req = GenerateReq(
            rid=item.rid,
            input_ids=item.input_ids,
            sampling=item.sampling,
            return_logprob=item.return_logprob,
            logprob_start_len=item.logprob_start_len,
            top_logprobs_num=item.top_logprobs_num,
            cache_salt=item.cache_salt,
        )
        if self.mode != "colocated" and not pd.local_prefill:
            assert pd.room is not None, "parse_pd_fields requires a room in PD modes"
            # The one check for a duplicate room: claimed before the first await, so two
            # concurrent requests with one room cannot both pass; released when the request
            # ends (or fails to start), after its worker forgot the room. Workers and hooks
            # rely on it.
            if pd.room in self.rooms_in_flight:
                raise RequestError(
                    400, f"bootstrap_room {pd.room} is already in flight on this server"
                )
            self.rooms_in_flight.add(pd.room)
            req.disagg = DisaggInfo(room=pd.room)
        try:
            req = await self._prepare(req, rank, item)
            self.controller.submit(req, rank)
        except BaseException:
            if req.disagg is not None:
                self.rooms_in_flight.discard(req.disagg.room)
            raise
        return req

    def stop(self) -> None:
        """The drain's deadline: requests still in the mode's hook fail with a 503 (their
        other leg learns it as any refusal's). The drain counted only requests a worker
        held, so it ended at once and aiohttp hung up on these unanswered."""
        self._stopping = True
        for work in self._preparing:
            work.cancel()

    @property
    def num_preparing(self) -> int:
        return len(self._preparing)

    async def _prepare(self, req: GenerateReq, rank: int, item: GenItem) -> GenerateReq:
        """The mode's hook, under the request's own deadline (the hooks have finer ones),
        until `stop`."""
        if self.mode == "colocated":  # its hook waits for nothing
            return await self._prepare_in_time(req, rank, item)
        if self._stopping:
            raise RequestError(503, SHUTTING_DOWN)
        work = asyncio.ensure_future(self._prepare_in_time(req, rank, item))
        self._preparing.add(work)
        try:
            return await work  # a client that leaves cancels `work` too
        except asyncio.CancelledError:
            if self._stopping and work.cancelled():
                raise RequestError(503, SHUTTING_DOWN) from None
            raise
        finally:
            self._preparing.discard(work)

    async def _prepare_in_time(self, req: GenerateReq, rank: int, item: GenItem) -> GenerateReq:
        try:
            # aio.wait_for: a client gone as the hook ends must not get its request submitted
            return await aio.wait_for(
                self.hooks.prepare(req, rank, item.pd), self.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise RequestError(
                504, f"preparing the request took longer than {self.request_timeout_s:g} s"
            ) from None

    async def _outputs(self, flight: InFlight, result: ItemResult) -> AsyncIterator[ReqOutput]:
        """The request's outputs until the caller stops; its deadline arrives as a 504 message
        queued by one timer, not as a timeout around every wait: each token of each request
        passes here, and a `wait_for` per message costs a task (about 40 against 8 us)."""
        timed_out = ReqOutput(
            rid=flight.req.rid,
            error_status=504,
            error_message=f"request timed out after {self.request_timeout_s:g} s",
        )
        remaining_s = result.started_at + self.request_timeout_s - time.monotonic()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(remaining_s, 0.0), flight.outputs.put_nowait, timed_out)
        try:
            while True:
                msg = await flight.outputs.get()  # no suspension while one is queued
                if msg.error_status is not None:
                    message = msg.error_message or "request failed"
                    raise RequestError(msg.error_status, message, origin=msg.error_origin)
                yield msg
        finally:
            timer.cancel()

    def _apply(self, msg: ReqOutput, detok: IncrementalDetokenizer, result: ItemResult) -> Delta:
        now = time.monotonic()
        if msg.new_token_ids:
            if result.first_token_at is None:
                result.first_token_at = now
                self.metrics.ttft_s.observe(now - result.started_at)
            elif result.last_token_at is not None:
                per_token_s = (now - result.last_token_at) / len(msg.new_token_ids)
                for _ in msg.new_token_ids:
                    self.metrics.itl_s.observe(per_token_s)
            result.last_token_at = now
        if msg.prompt_logprobs is not None:
            result.prompt_logprobs = msg.prompt_logprobs
            result.prompt_top_logprobs = msg.prompt_top_logprobs
        result.cached_tokens = max(result.cached_tokens, msg.cached_tokens)
        if msg.kv_transfer_s is not None:  # the output that reports the transfer
            result.kv_transfer_bytes = (result.kv_transfer_bytes or 0) + msg.kv_bytes
        result.decode_cached_tokens = max(result.decode_cached_tokens, msg.decode_cached_tokens)
        result.output_ids.extend(msg.new_token_ids)
        result.output_logprobs.extend(msg.new_token_logprobs)
        result.output_top_logprobs.extend(msg.new_top_logprobs)
        text_ids = msg.new_token_ids
        if _ends_on_stop_token(msg, result.item.sampling.no_stop_trim):
            text_ids = text_ids[:-1]  # counted and kept in output_ids, but not text
        text = detok.add(text_ids)
        result.text = detok.text[: detok.num_released]
        if msg.finish_reason is not None and result.finish_reason is None:
            result.finish_reason = msg.finish_reason
        return Delta(
            text, list(msg.new_token_ids), list(msg.new_token_logprobs), list(msg.new_top_logprobs)
        )

    def _close(self, req: GenerateReq, result: ItemResult, error: RequestError | None) -> None:
        if req.disagg is not None:
            self.rooms_in_flight.discard(req.disagg.room)
        result.finished_at = time.monotonic()
        if error is not None:
            self.controller.abort(req.rid, error.message)
        self.controller.forget(req.rid)
        with contextlib.suppress(Exception):
            self.hooks.on_finished(req, error)
        if isinstance(error, RequestCancelled):
            status = "cancelled"
        elif error is not None:
            status = "error"
        else:
            status = result.finish_reason.type if result.finish_reason else "unknown"
        self.metrics.observe_finished(
            status,
            len(req.input_ids),
            len(result.output_ids),
            result.cached_tokens,
            result.e2e_latency_s,
        )


def _ends_on_stop_token(msg: ReqOutput, no_stop_trim: bool) -> bool:
    """The request stopped on a stop token (EOS or `stop_token_ids`) that is this message's
    last: like SGLang and vLLM, its text is left out of the answer unless `no_stop_trim`."""
    reason = msg.finish_reason
    return (
        not no_stop_trim
        and reason is not None
        and reason.type == "stop"
        and isinstance(reason.matched, int)
        and bool(msg.new_token_ids)
        and msg.new_token_ids[-1] == reason.matched
    )


async def run_to_end(
    gen: Generator,
    item: GenItem,
    client_gone: ClientGone | None = None,
    result: ItemResult | None = None,
) -> ItemResult:
    result = result or ItemResult(item=item, started_at=time.monotonic())
    async with contextlib.aclosing(gen.run(item, result, client_gone)) as deltas:
        async for _ in deltas:
            pass
    return result


async def merged(
    gen: Generator, items: list[GenItem], client_gone: ClientGone | None = None
) -> AsyncIterator[tuple[int, ItemResult, Delta]]:
    """Interleaves the deltas of several items; cancels the rest if one fails or we stop.
    The caller reads the item's result (its whole text, its finish_reason) along with each
    delta, so an item's next output is applied only once the caller has asked for more: a
    pump running ahead had shown a slow reader a finish_reason on a chunk before the last."""
    results = [ItemResult(item=item, started_at=time.monotonic()) for item in items]
    if len(items) == 1:  # most requests: no task and queue between the outputs and the caller
        try:
            async with contextlib.aclosing(gen.run(items[0], results[0], client_gone)) as deltas:
                async for delta in deltas:
                    yield 0, results[0], delta
        except RequestError:
            raise
        except Exception as exc:  # as the pumps below: never lose an item silently
            raise RequestError(500, f"internal error: {exc!r}") from exc
        return
    queue: asyncio.Queue = asyncio.Queue()
    taken = [asyncio.Event() for _ in items]

    async def pump(index: int) -> None:
        try:
            async with contextlib.aclosing(
                gen.run(items[index], results[index], client_gone)
            ) as deltas:
                async for delta in deltas:
                    taken[index].clear()
                    queue.put_nowait((index, delta, None))
                    await taken[index].wait()
        except RequestError as exc:
            queue.put_nowait((index, None, exc))
        except Exception as exc:  # never lose an item silently
            queue.put_nowait((index, None, RequestError(500, f"internal error: {exc!r}")))
        finally:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(items))]
    try:
        num_done = 0
        while num_done < len(items):
            index, delta, exc = await queue.get()
            if exc is not None:
                _fail_siblings(results, exc)
                raise exc
            if delta is None:
                num_done += 1
                continue
            yield index, results[index], delta
            taken[index].set()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_all(
    gen: Generator, items: list[GenItem], client_gone: ClientGone | None = None
) -> list[ItemResult]:
    """Runs items concurrently; the first failure ends the others with it and is raised."""
    results = [ItemResult(item=item, started_at=time.monotonic()) for item in items]
    tasks = [
        asyncio.create_task(run_to_end(gen, item, client_gone, result))
        for item, result in zip(items, results, strict=True)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except RequestError as exc:
        _fail_siblings(results, exc)
        raise
    finally:
        for task in tasks:
            task.cancel()


def _fail_siblings(results: list[ItemResult], error: RequestError) -> None:
    """Before the other items of a failed request are cancelled: they end with its error."""
    for result in results:
        if result.finish_reason is None:
            result.sibling_error = error
