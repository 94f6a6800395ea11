"""Background watch over the workers: `/health` checks with thresholds, `/server_info`
(DP size) and `/get_load` refreshes (router process)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.http_client import HttpClient, HttpError
from pdserve.router.kv_follow import KVFollower
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)
LOAD_POLICIES = {"power_of_two", "cache_aware", "kv_aware"}
CHECK_ERRORS = (HttpError, RuntimeError, ValueError)  # ValueError: bad JSON or fields


def tokens_per_rank(answer: Any) -> list[int]:
    """`/get_load` as a list of tokens per DP rank. Accepts SGLang's list of
    `{"num_tokens": ...}` (one per rank) or a single such object."""
    items = answer if isinstance(answer, list) else [answer]
    tokens = []
    for item in items:
        value = item.get("num_tokens") if isinstance(item, dict) else None
        if not isinstance(value, int):
            raise ValueError(f"unexpected /get_load answer: {answer!r}")
        tokens.append(value)
    return tokens


class Monitor:
    def __init__(
        self,
        config: RouterConfig,
        registry: WorkerRegistry,
        metrics: RouterMetrics,
        kv_follower: KVFollower | None = None,
        prompt_tokenizer: PromptTokenizer | None = None,
    ):
        self.config = config
        self.kv_follower = kv_follower  # set when a policy routes on KV events
        self.prompt_tokenizer = prompt_tokenizer  # learns the servers' tokenizer directory
        self.registry = registry
        self.metrics = metrics
        self.info: dict[str, dict[str, Any]] = {}  # url -> its /server_info answer
        self.client: HttpClient = None  # type: ignore[assignment]  # set in start()
        self._tasks: list[asyncio.Task] = []
        self._started_at = 0.0
        self._timeout_s = config.health_check_timeout_s

    def start(self, client: HttpClient, specs: Iterable[WorkerSpec]) -> None:
        self.client = client
        self._started_at = time.monotonic()
        for spec in specs:  # out of rotation until their first check passes
            self.registry.add(self.registry.new_worker(spec))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        c = self.config
        policies = {c.policy_for("prefill"), c.policy_for("decode"), c.policy_for("regular")}
        if policies & LOAD_POLICIES or c.dp_aware or c.align_room:
            self._tasks.append(asyncio.create_task(self._load_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.kv_follower is not None:
            await self.kv_follower.stop()

    async def forget(self, url: str) -> None:
        """The worker left the registry."""
        self.info.pop(url, None)
        if self.kv_follower is not None:
            await self.kv_follower.drop(url)

    async def _get(self, url: str, path: str) -> bytes:
        status, body = await self.client.get(url, path, self._timeout_s)
        if status != 200:
            raise RuntimeError(f"GET {url}{path}: HTTP {status}")
        return body

    async def _get_json(self, url: str, path: str) -> Any:
        return msgspec.json.decode(await self._get(url, path))

    async def _fetch_info(self, url: str) -> dict[str, Any]:
        info = await self._get_json(url, "/server_info")
        if not isinstance(info, dict):
            raise RuntimeError(f"GET {url}/server_info: not a JSON object")
        self.info[url] = info
        if self.prompt_tokenizer is not None:
            self.prompt_tokenizer.offer(info.get("tokenizer_path"))
        if self.kv_follower is not None:
            await self.kv_follower.follow(url, info)
        return info

    async def probe_new(self, spec: WorkerSpec) -> Worker:
        """A worker added at runtime: healthy now, with its DP size, or an exception."""
        await self._get(spec.url, "/health")
        info = await self._fetch_info(spec.url)
        return self.registry.new_worker(spec, dp_size=int(info.get("dp_size") or 1), healthy=True)

    async def check(self, worker: Worker) -> bool:
        """One health check; the first passing one also learns the worker's DP size."""
        try:
            await self._get(worker.url, "/health")
            if worker.url not in self.info:
                worker.set_dp_size(int((await self._fetch_info(worker.url)).get("dp_size") or 1))
            elif self.kv_follower is not None and not self.kv_follower.follows(worker.url):
                await self._fetch_info(worker.url)  # back from a failure: a new life, new ports
            return True
        except CHECK_ERRORS as exc:
            log.debug("health check of %s failed: %r", worker.url, exc)
            return False

    async def check_all(self) -> None:
        workers = self.registry.all()
        results = await asyncio.gather(*(self.check(w) for w in workers))
        for worker, ok in zip(workers, results, strict=True):
            if worker.health.record(ok):
                healthy = worker.health.healthy
                if not healthy and self.kv_follower is not None:
                    await self.kv_follower.drop(worker.url)
                log.log(
                    logging.INFO if healthy else logging.WARNING,
                    "%s server %s is now %s",
                    worker.role,
                    worker.url,
                    "healthy" if healthy else "UNHEALTHY",
                )

    async def _health_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.check_all()
            # While starting, check often so readiness is not held back by the period.
            all_in = all(w.health.healthy for w in self.registry.all())
            starting = time.monotonic() - self._started_at < self.config.startup_timeout_s
            period = self.config.health_check_interval_s if all_in or not starting else 0.2
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    async def refresh_load(self, worker: Worker) -> None:
        try:
            worker.set_reported_load(tokens_per_rank(await self._get_json(worker.url, "/get_load")))
        except CHECK_ERRORS as exc:
            log.debug("load of %s unknown: %r", worker.url, exc)

    async def _load_loop(self) -> None:
        while True:
            workers = [w for w in self.registry.all() if w.health.healthy]
            await asyncio.gather(*(self.refresh_load(w) for w in workers))
            await asyncio.sleep(self.config.load_refresh_interval_s)

    def update_gauges(self) -> None:
        self.metrics.healthy.clear()
        self.metrics.in_flight.clear()
        for w in self.registry.all():
            self.metrics.healthy.labels(w.url, w.role).set(1 if w.health.healthy else 0)
            self.metrics.in_flight.labels(w.url, w.role).set(w.in_flight)
