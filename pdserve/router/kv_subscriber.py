"""Follows one server's KV event stream into the router's `KVIndex` (router process).

SUB on the server's `kv_events_endpoint`; a snapshot from its replay endpoint gives the
base; a gap is filled by replay (or a fresh snapshot when the server no longer has the
batches); a server that started again is resynchronised the same way and marked restarted
(its /server_info is read again: it may hash its pages otherwise now), or, on other ports,
found silent and marked lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pdserve.router.kv_index import BatchVerdict, WorkerCache

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 5.0
# After a failure, the wait before resynchronising (a server sending garbage or refusing
# snapshots is not asked in a tight loop).
RESYNC_DELAY_S = 0.1
# No batch for this long: ask the replay socket what we missed. A quiet server answers with
# nothing new, one started again on the same ports with a snapshot, and one started again on
# other ports not at all, which marks this subscriber lost so the monitor follows anew.
IDLE_PROBE_S = 5.0


class KVSubscriber:
    def __init__(
        self, ctx: zmq.asyncio.Context, cache: WorkerCache, endpoint: str, replay_endpoint: str
    ):
        self.cache = cache
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self._ctx = ctx
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.IPV6, 1)  # a server on an IPv6 host (IPv4 as before)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self.num_resyncs = 0
        self.num_replays = 0
        self.drop_next = False  # lose the next live batch, as a slow subscriber would
        self.num_live_batches = 0
        self.lost = False  # the replay socket did not answer the last question
        # The server started again since the first snapshot (a new life): its page size or
        # model, so how its pages are hashed, may have changed with it.
        self.restarted = False
        self._first_life: int | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sub.close()

    async def _run(self) -> None:
        # Subscribed before the snapshot: batches that race it wait in the socket and are
        # applied (or skipped as already in it) afterwards.
        while True:
            try:
                await self._follow()
            except Exception as exc:  # noqa: BLE001 - whatever a server sends (garbage, a
                # truncated or malformed batch, a lost answer), the follower must go on: a
                # dead one would leave its index stale for good.
                log.warning("KV events of %s: %r; resynchronising", self.endpoint, exc)
                self.cache.last_seq = None
            await asyncio.sleep(RESYNC_DELAY_S)

    async def _follow(self) -> None:
        if self.cache.last_seq is None:
            await self._resync()
        while True:
            if not await self._sub.poll(int(IDLE_PROBE_S * 1000)):
                await self._catch_up()
                continue
            batch = msgspec.msgpack.decode(await self._sub.recv())
            self.num_live_batches += 1
            if self.drop_next:  # tests: lose one batch as a slow subscriber would
                self.drop_next = False
                continue
            verdict = self.cache.offer_live(batch)
            # Either way the answer covers this batch: it was published before we asked.
            if verdict is BatchVerdict.RESYNC:
                await self._resync()
            elif verdict is BatchVerdict.GAP:
                await self._catch_up()

    async def _resync(self) -> None:
        answer = await self._ask({"op": "snapshot"})
        self._load_snapshot(answer["snapshot"])

    def _load_snapshot(self, snapshot: dict[str, Any]) -> None:
        self.cache.load_snapshot(snapshot)
        self.num_resyncs += 1
        life = self.cache.life
        if self._first_life is None:
            self._first_life = life
        elif life is not None and life != self._first_life:
            self.restarted = True

    async def _catch_up(self) -> None:
        assert self.cache.last_seq is not None
        request: dict[str, Any] = {"op": "replay", "from_seq": self.cache.last_seq + 1}
        if self.cache.life is not None:  # a server started again answers with a snapshot
            request["life"] = self.cache.life
        answer = await self._ask(request)
        self.num_replays += 1
        if "snapshot" in answer:
            self._load_snapshot(answer["snapshot"])
            return
        for batch in answer["batches"]:
            if self.cache.offer(batch) is BatchVerdict.RESYNC:  # the server started again
                await self._resync()
                return

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One question to the replay socket; a fresh REQ socket each time, so a lost
        answer cannot wedge the REQ state machine."""
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(self.replay_endpoint)
            await sock.send(msgspec.msgpack.encode(request))
            if not await sock.poll(int(REPLAY_TIMEOUT_S * 1000)):
                self.lost = True
                raise TimeoutError(f"no answer from {self.replay_endpoint}")
            self.lost = False
            answer = msgspec.msgpack.decode(await sock.recv())
        finally:
            sock.close()
        if "error" in answer:
            raise KeyError(answer["error"])
        return answer
