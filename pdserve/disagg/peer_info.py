"""What a decode front end knows about prefill servers: their info and worker endpoints
(cached), and room ranks (batched `/query_dp_ranks` polling). Runs in the decode front end.

Every call has a deadline; a missing answer becomes a RequestError with a reason, whose
`origin` is the prefill server (its bootstrap server failed or refused, or failed the room:
unless that failure names decode as its cause, see `room_failure_error`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from pdserve.disagg.bootstrap_client import (
    BootstrapClientError,
    fetch_server_info,
    fetch_worker,
    query_dp_ranks_with_epoch,
)
from pdserve.disagg.bootstrap_registry import (
    MAX_ROOMS_PER_QUERY,
    RoomFailure,
    ServerInfo,
    WorkerRegistration,
)
from pdserve.disagg.metrics import DisaggMetrics
from pdserve.disagg.rank_query import PendingRooms
from pdserve.serving.hooks import DECODE_ORIGIN, PREFILL_ORIGIN, RequestError

log = logging.getLogger(__name__)

T = TypeVar("T")
INFO_TTL_S = 30.0
ENDPOINT_TTL_S = 10.0  # a restarted prefill worker re-registers with a new endpoint
RETRY_MIN_S, RETRY_MAX_S = 0.02, 0.5
CALL_TIMEOUT_S = 5.0
# A bootstrap server that refuses connections this long is down, not slow: fail the request
# (503, naming the address) instead of waiting out the deadline. Each new request asks again.
UNREACHABLE_AFTER_S = 1.0


def prefill_error(status: int, message: str) -> RequestError:
    """A decode leg failed by its prefill server (see hooks.PREFILL_ORIGIN)."""
    return RequestError(status, message, origin=PREFILL_ORIGIN)


def room_failure_error(failure: RoomFailure) -> RequestError:
    """A decode leg failed by a room's failure its prefill server published: prefill's
    fault, unless the failure says decode caused it (e.g. prefill's wait for our page list
    lapsed), which makes it ours: no origin."""
    if failure.origin == DECODE_ORIGIN:
        return RequestError(failure.status, failure.error)
    return prefill_error(failure.status, failure.error)


class StalePrefillInfo(Exception):
    """An answer came from another start of the prefill server than the server info a room
    was resolved on (it restarted, perhaps with another --dp-size or rank rule)."""


async def call_with_retry(fn: Callable[[float], Awaitable[T]], what: str, timeout_s: float) -> T:
    """Retry `fn(call_timeout_s)` on retryable bootstrap errors with backoff until the deadline."""
    start = time.monotonic()
    deadline = start + timeout_s
    interval_s = RETRY_MIN_S
    while True:
        remaining_s = deadline - time.monotonic()
        try:
            return await fn(max(0.05, min(CALL_TIMEOUT_S, remaining_s)))
        except BootstrapClientError as exc:
            if not exc.retryable:
                raise prefill_error(502, f"{what}: {exc}") from None
            if exc.refused and time.monotonic() - start >= UNREACHABLE_AFTER_S:
                raise prefill_error(503, f"{what} is unreachable: {exc}") from None
            if time.monotonic() + interval_s >= deadline:
                raise prefill_error(
                    504, f"{what}: no usable answer within {timeout_s:g}s: {exc}"
                ) from None
        await asyncio.sleep(interval_s)  # retry backoff, bounded by the deadline
        interval_s = min(interval_s * 2, RETRY_MAX_S)


class _TTLCache:
    """Single-flight cache: one fetch per key at a time, answers kept for `ttl_s`."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._values: dict[object, tuple[float, object]] = {}
        self._inflight: dict[object, asyncio.Task] = {}

    async def get(self, key: object, fetch: Callable[[], Awaitable[T]]) -> T:
        hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]  # type: ignore[return-value]
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(fetch())
            task.add_done_callback(lambda t, k=key: self._done(k, t))
        return await asyncio.shield(task)

    def fetched_at(self, key: object) -> float | None:
        """When the value cached for `key` was fetched (monotonic), if one is."""
        hit = self._values.get(key)
        return None if hit is None else hit[0]

    def items(self) -> list[tuple[Any, Any]]:
        """The cached (key, value) pairs, expired or not."""
        return [(key, value) for key, (_, value) in self._values.items()]

    def drop(self, matches: Callable[[object], bool]) -> None:
        for key in [k for k in self._values if matches(k)]:
            del self._values[key]

    def _done(self, key: object, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._values[key] = (time.monotonic(), task.result())


class RankQuerier:
    """Batches every pending room of one bootstrap server into one query per poll."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, timeout_s: float, metrics: DisaggMetrics
    ):
        self.session, self.url, self.timeout_s, self.metrics = session, url, timeout_s, metrics
        self.pending = PendingRooms()
        self.futures: dict[int, asyncio.Future[int]] = {}
        self.epochs: dict[int, int] = {}  # of the server info each room was resolved on
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.refused_since: float | None = None

    async def resolve(self, room: int, epoch: int) -> int:
        """The rank of `room`, asked of the server whose info (of restart `epoch`) said to
        query; StalePrefillInfo when a server of another epoch answers."""
        # One resolve per room at a time: the front end claims each room once.
        assert room not in self.futures, f"room {room} is already being resolved"
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.futures[room] = future
        self.epochs[room] = epoch
        self.pending.add(room, time.monotonic(), self.timeout_s)
        self.wakeup.set()
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        try:
            return await future
        finally:  # also on cancellation (client gone): stop asking about this room
            self.futures.pop(room, None)
            self.epochs.pop(room, None)
            self.pending.discard(room)

    def _settle(self, room: int, rank: int | None = None, error: Exception | None = None) -> None:
        future = self.futures.get(room)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(rank)  # type: ignore[arg-type]

    async def _poll_once(self) -> None:
        rooms = self.pending.rooms()
        self.pending.on_sent(time.monotonic())
        # The bootstrap server takes at most MAX_ROOMS_PER_QUERY rooms a query: one query of
        # more was refused (400), which failed every pending room of the server at once.
        step = MAX_ROOMS_PER_QUERY
        await asyncio.gather(
            *(self._query(rooms[i : i + step]) for i in range(0, len(rooms), step))
        )

    async def _query(self, rooms: list[int]) -> None:
        try:
            answer, epoch = await query_dp_ranks_with_epoch(
                self.session, self.url, rooms, CALL_TIMEOUT_S
            )
        except BootstrapClientError as exc:
            if exc.retryable and not self._down_too_long(exc):
                return  # asked again after the backoff, until each room's deadline
            status = 503 if exc.retryable else 502
            for room in rooms:
                self._settle(
                    room, error=prefill_error(status, f"rank query to {self.url} failed: {exc}")
                )
            return
        self.refused_since = None
        self.metrics.query_round_trip(len(rooms))
        if epoch is not None:
            self._settle_stale(rooms, epoch)
        outcome = self.pending.on_answer(answer)
        for room, rank in outcome.resolved.items():
            self._settle(room, rank=rank)
        for room, failure in outcome.failed.items():
            self._settle(room, error=room_failure_error(failure))

    def _settle_stale(self, rooms: list[int], epoch: int) -> None:
        """Rooms resolved on info of another start of the server: that start's rank rule
        (and dp_size) no longer holds, and this server may never publish their ranks."""
        for room in rooms:
            if self.epochs.get(room, epoch) != epoch:
                self.pending.discard(room)
                self._settle(
                    room,
                    error=StalePrefillInfo(
                        f"prefill server {self.url} restarted (epoch {self.epochs[room]} -> "
                        f"{epoch}) while decode asked for the DP rank of room {room}"
                    ),
                )

    def _down_too_long(self, exc: BootstrapClientError) -> bool:
        """Whether the server has refused connections for UNREACHABLE_AFTER_S."""
        if not exc.refused:
            self.refused_since = None
            return False
        now = time.monotonic()
        if self.refused_since is None:
            self.refused_since = now
        return now - self.refused_since >= UNREACHABLE_AFTER_S

    async def _run(self) -> None:
        try:
            while len(self.pending):
                now = time.monotonic()
                for room in self.pending.expire(now):
                    self._settle(
                        room,
                        error=prefill_error(
                            504,
                            (
                                f"prefill server {self.url} did not publish the DP rank of room {room} "
                                f"within {self.timeout_s:g}s (did the prefill leg of this room arrive?)"
                            ),
                        ),
                    )
                if self.pending.poll_due(now):
                    await self._poll_once()
                wake = self.pending.next_wakeup()
                if wake is None:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), max(0.0, wake - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        except Exception as exc:  # a bug here must fail the rooms, not leave them waiting
            log.exception("rank queries to %s stopped", self.url)
            for room in self.pending.rooms():
                self.pending.discard(room)
                self._settle(room, error=RequestError(500, f"rank query failed: {exc!r}"))
        finally:
            self.task = None


class PeerDirectory:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float, metrics: DisaggMetrics):
        self.session, self.timeout_s, self.metrics = session, timeout_s, metrics
        self._infos = _TTLCache(INFO_TTL_S)
        self._endpoints = _TTLCache(ENDPOINT_TTL_S)
        self._queriers: dict[str, RankQuerier] = {}
        self._epochs: dict[str, int] = {}  # the last restart epoch seen of each prefill server

    def info_fetched_at(self, url: str) -> float | None:
        """When the server info cached for `url` was fetched (monotonic), if it is cached."""
        return self._infos.fetched_at(url)

    async def server_info(self, url: str) -> ServerInfo:
        what = f"prefill bootstrap server {url} (GET /route)"
        info = await self._infos.get(
            url,
            lambda: call_with_retry(
                lambda t: fetch_server_info(self.session, url, t), what, self.timeout_s
            ),
        )
        self.note_epoch(url, info.epoch)
        return info

    async def worker(self, url: str, rank: int) -> WorkerRegistration:
        """The registration (KV endpoint, epoch) of prefill worker `rank` at `url`."""
        what = f"prefill bootstrap server {url} (GET /route?prefill_dp_rank={rank})"
        reg = await self._endpoints.get(
            (url, rank),
            lambda: call_with_retry(
                lambda t: fetch_worker(self.session, url, rank, t), what, self.timeout_s
            ),
        )
        self.note_epoch(url, reg.epoch)
        return reg

    def note_epoch(self, url: str, epoch: int) -> None:
        """An answer from `url` carries `epoch`: one unlike the last seen means the prefill
        server restarted, so what is cached from its earlier start is dropped."""
        if self._epochs.setdefault(url, epoch) != epoch:
            self._epochs[url] = epoch
            self.metrics.epoch_change()
            self.forget(url)

    def forget_endpoints(self, endpoints: list[str]) -> None:
        """Forget the prefill servers whose workers listened at these KV endpoints."""
        lost = set(endpoints)
        for url in {url for (url, _), reg in self._endpoints.items() if reg.kv_endpoint in lost}:
            self.forget(url)

    def forget(self, url: str) -> None:
        """Drop what is cached about the prefill server at `url` (after a failure: it may
        have restarted on other ports), so the next request asks its bootstrap server."""
        self._infos.drop(lambda key: key == url)
        self._endpoints.drop(lambda key: key[0] == url)

    async def query_rank(self, url: str, room: int, epoch: int) -> int:
        """The rank of `room` from the server at `url`, whose info of restart `epoch` said
        to ask; StalePrefillInfo when another start of it answers."""
        querier = self._queriers.get(url)
        if querier is None:
            querier = self._queriers[url] = RankQuerier(
                self.session, url, self.timeout_s, self.metrics
            )
        return await querier.resolve(room, epoch)


__all__ = ["PeerDirectory", "RankQuerier", "RoomFailure", "StalePrefillInfo", "call_with_retry"]
