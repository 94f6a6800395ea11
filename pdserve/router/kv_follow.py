"""Keeps one `KVSubscriber` per worker that advertises KV events, feeding the router's
`KVIndex` (router process). The monitor calls it when it learns a worker's /server_info
and when a worker leaves or fails its health checks."""

from __future__ import annotations

import logging
from typing import Any

import zmq
import zmq.asyncio

from pdserve.engine.page_hash import HASH_BYTES
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_subscriber import KVSubscriber

log = logging.getLogger(__name__)


class KVFollower:
    def __init__(self, index: KVIndex):
        self.index = index
        self._ctx = zmq.asyncio.Context()
        self._subs: dict[str, KVSubscriber] = {}
        self._refused: dict[str, str] = {}  # url -> why its events are not followed (warned)

    def follows(self, url: str) -> bool:
        """Following the worker, its events server answers (a server started again on other
        ports does not) and has not started again (on the same ports: its page size or model
        may be new). Otherwise the monitor reads its /server_info anew."""
        sub = self._subs.get(url)
        return sub is not None and not sub.lost and not sub.restarted

    async def follow(self, url: str, info: dict[str, Any]) -> None:
        """Start (or restart) following the worker; one without an events endpoint (another
        server, an older pdserve) stays unindexed and is routed by load alone. The new
        subscriber is in place before the first await, so a `drop` that comes while the old
        one stops also stops the new one."""
        old = self._subs.pop(url, None)
        self.index.forget(url)
        endpoint = info.get("kv_events_endpoint")
        replay = info.get("kv_events_replay_endpoint")
        seed, page_size = info.get("kv_events_hash_seed"), info.get("page_size")
        if endpoint and replay and isinstance(seed, int) and isinstance(page_size, int):
            why = self._unusable(endpoint, replay, page_size, seed)
            if why is None:
                self._refused.pop(url, None)
                cache = self.index.track(url, page_size, seed)
                self._subs[url] = sub = KVSubscriber(self._ctx, cache, endpoint, replay)
                sub.start()
                log.info("following KV events of %s at %s", url, endpoint)
            elif self._refused.get(url) != why:  # once, not at every health check
                self._refused[url] = why
                log.warning("not following KV events of %s (routed by load): %s", url, why)
        if old is not None:
            await old.stop()

    def _unusable(self, endpoint: object, replay: object, page_size: int, seed: int) -> str | None:
        """Why a worker's advertised events cannot be followed, or None. Its /server_info is
        not ours to trust: a ZeroMQ error out of `follow` ended the router's health checks,
        and a hash seed past 64 bits (or below 0), once its events were followed, failed
        every salted request of the role with a 500 (the salted seed packs it in 8 bytes)."""
        if page_size < 1:
            return f"page_size {page_size}"
        if not 0 <= seed < 1 << (8 * HASH_BYTES):
            return f"kv_events_hash_seed {seed} is not a 64-bit unsigned integer"
        for address in (endpoint, replay):
            if not isinstance(address, str):
                return f"endpoint {address!r} is not a string"
            sock = self._ctx.socket(zmq.SUB)
            try:
                sock.connect(address)  # only checks the address: no connection is awaited
            except zmq.ZMQError as exc:
                return f"ZeroMQ cannot connect to {address!r} ({exc})"
            finally:
                sock.close(linger=0)
        return None

    async def drop(self, url: str) -> None:
        self.index.forget(url)
        self._refused.pop(url, None)
        sub = self._subs.pop(url, None)
        if sub is not None:
            await sub.stop()

    async def stop(self) -> None:
        for url in list(self._subs):
            await self.drop(url)
        self._ctx.destroy(linger=0)
