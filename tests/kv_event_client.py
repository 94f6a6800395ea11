"""Test-side access to a server's KV events: questions to its replay socket, and the
router's real `KVSubscriber` run on an event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pdserve.router.kv_index import WorkerCache
from pdserve.router.kv_subscriber import KVSubscriber
from tests.helpers import http_json

ANSWER_TIMEOUT_MS = 10_000


def ask_replay(endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgspec.msgpack.encode(request))
        assert sock.poll(ANSWER_TIMEOUT_MS), f"no answer from {endpoint}"
        return msgspec.msgpack.decode(sock.recv())
    finally:
        sock.close()


def events_since(info: dict[str, Any], seq: int) -> list[dict[str, Any]]:
    """Every event published after batch `seq` (the server still holds them)."""
    answer = ask_replay(info["kv_events_replay_endpoint"], {"op": "replay", "from_seq": seq + 1})
    assert "batches" in answer, answer
    return [event for batch in answer["batches"] for event in batch["events"]]


def dump(url: str, rank: int) -> set[int]:
    status, body = http_json("GET", f"{url}/debug/kv_cache?dp_rank={rank}")
    assert status == 200, body
    return set(body["page_hashes"])


class SubscriberThread:
    """The router's subscriber for one server, followed from another thread."""

    def __init__(self, info: dict[str, Any]):
        self.cache = WorkerCache()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.sub: KVSubscriber = self._call(self._start(info))

    async def _start(self, info: dict[str, Any]) -> KVSubscriber:
        sub = KVSubscriber(
            zmq.asyncio.Context.instance(),
            self.cache,
            info["kv_events_endpoint"],
            info["kv_events_replay_endpoint"],
        )
        sub.start()
        return sub

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _ranks(self) -> dict[int, set[int]]:
        return {rank: set(hashes) for rank, hashes in self.cache.ranks.items()}

    def ranks(self) -> dict[int, set[int]]:
        return self._call(self._ranks())

    def close(self) -> None:
        self._call(self.sub.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
