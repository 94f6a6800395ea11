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
from pdserve.router.health import BreakerState
from pdserve.router.http_client import HttpClient, HttpError
from pdserve.router.kv_follow import KVFollower
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)
LOAD_POLICIES = {"power_of_two", "cache_aware", "kv_aware"}
CHECK_ERRORS = (HttpError, RuntimeError, ValueError)  # ValueError: bad JSON or fields
KEY_REFUSED_STATUSES = (401, 403)


def stuck_reason(worker: Worker, exc: Exception) -> str | None:
    """What a failed check says that no retry heals, or None."""
    status = getattr(exc, "status", None)
    if status in KEY_REFUSED_STATUSES:
        return f"{worker.url} refused the router's API key (HTTP {status})"
    return str(exc) if isinstance(exc, RoleMismatch) else None


class RoleMismatch(ValueError):
    """A worker's /server_info names another mode than its role: it stays out of rotation."""


class WorkerAnswerError(RuntimeError):
    """A worker answered a health or info request with another status than 200."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


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


def dp_size_of(info: dict[str, Any]) -> int:
    dp_size = info.get("dp_size") or 1
    if not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"/server_info: dp_size must be an int >= 1, got {dp_size!r}")
    return dp_size


# The server mode (`/server_info` `disaggregation_mode`) that serves each router role.
MODE_OF_ROLE = {"prefill": "prefill", "decode": "decode", "regular": "null"}


def role_mismatch(role: str, info: dict[str, Any]) -> str | None:
    """Why a server cannot serve `role`, from the mode its /server_info names (None when it
    names none this router knows: another server). Swapped, a prefill server given as decode
    answers the client with its one-token leg, silently cut short."""
    mode = info.get("disaggregation_mode")
    if mode not in MODE_OF_ROLE.values() or mode == MODE_OF_ROLE[role]:
        return None
    name = "colocated" if mode == "null" else mode
    return f"it is a {name} server (/server_info disaggregation_mode {mode!r}), not a {role} one"


def kv_fields(info: dict[str, Any] | None) -> tuple[Any, ...]:
    """What following a worker's KV events depends on."""
    names = ("kv_events_endpoint", "kv_events_replay_endpoint", "kv_events_hash_seed", "page_size")
    return tuple((info or {}).get(name) for name in names)


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
        self._key_refused: set[str] = set()  # urls warned about, until they accept the key
        self._role_warned: set[str] = set()  # urls of another mode than their role, warned
        self._rank_warned: set[str] = set()  # urls whose ranks a cache policy cannot steer

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
            raise WorkerAnswerError(f"GET {url}{path}: HTTP {status}", status)
        return body

    async def _get_json(self, url: str, path: str) -> Any:
        return msgspec.json.decode(await self._get(url, path))

    async def _read_info(self, url: str) -> dict[str, Any]:
        info = await self._get_json(url, "/server_info")
        if not isinstance(info, dict):
            raise RuntimeError(f"GET {url}/server_info: not a JSON object")
        return info

    async def learn(self, worker: Worker, info: dict[str, Any]) -> None:
        """Apply a registered worker's /server_info: its DP size, its tokenizer, its KV
        events endpoints (followed anew when they changed or went silent). No await comes
        before the follower is set, so a removal after the caller's check stops it. A
        server of another mode than the worker's role is refused (RoleMismatch)."""
        mismatch = role_mismatch(worker.role, info)
        if mismatch is not None:
            raise RoleMismatch(f"{worker.role} worker {worker.url}: {mismatch}")
        dp_size = dp_size_of(info)
        old = self.info.get(worker.url)
        self.info[worker.url] = info
        if dp_size != worker.dp_size:
            log.info(
                "%s server %s: DP size %d -> %d", worker.role, worker.url, worker.dp_size, dp_size
            )
        worker.set_dp_size(dp_size)
        unsteered = self.config.unsteered_ranks(worker.role, dp_size)
        if unsteered is not None and worker.url not in self._rank_warned:
            self._rank_warned.add(worker.url)
            log.warning("%s server %s: %s", worker.role, worker.url, unsteered)
        if self.prompt_tokenizer is not None:
            self.prompt_tokenizer.offer(info.get("tokenizer_path"))
        follower = self.kv_follower
        if follower is not None and (
            not follower.follows(worker.url) or kv_fields(old) != kv_fields(info)
        ):
            await follower.follow(worker.url, info)

    async def refresh_info(self, worker: Worker) -> None:
        """Read the worker's /server_info anew; dropped if the worker left the registry (or
        left and came back as another) while the answer came: removal wins."""
        info = await self._read_info(worker.url)
        if self.registry.get(worker.url) is worker:
            await self.learn(worker, info)

    async def probe_new(self, spec: WorkerSpec) -> tuple[Worker, dict[str, Any]]:
        """A worker added at runtime: healthy now, with its DP size and its /server_info for
        `learn` once registered, or an exception."""
        await self._get(spec.url, "/health")
        info = await self._read_info(spec.url)
        mismatch = role_mismatch(spec.role, info)
        if mismatch is not None:
            raise RoleMismatch(f"{spec.role} worker {spec.url}: {mismatch}")
        return self.registry.new_worker(spec, dp_size=dp_size_of(info), healthy=True), info

    def _needs_info(self, worker: Worker) -> bool:
        """Not read yet; or out of rotation, so maybe restarted with another DP size or other
        events ports; or its events server went silent (a new life)."""
        if worker.url not in self.info or not worker.health.healthy:
            return True
        return self.kv_follower is not None and not self.kv_follower.follows(worker.url)

    async def check(self, worker: Worker) -> bool:
        """One health check; passing, it reads /server_info when `_needs_info` says so."""
        try:
            await self._get(worker.url, "/health")
            if self._needs_info(worker):
                await self.refresh_info(worker)
            self._key_refused.discard(worker.url)
            self._role_warned.discard(worker.url)
            worker.health.stuck_reason = None
            return True
        except CHECK_ERRORS as exc:
            log.debug("health check of %s failed: %r", worker.url, exc)
            worker.health.stuck_reason = stuck_reason(worker, exc)
            self._warn_key_refused(worker, exc)
            self._warn_role_mismatch(worker, exc)
            return False

    def _warn_role_mismatch(self, worker: Worker, exc: Exception) -> None:
        """Once per worker (until it passes a check): like a refused key, it never heals."""
        if isinstance(exc, RoleMismatch) and worker.url not in self._role_warned:
            self._role_warned.add(worker.url)
            log.warning("%s; it stays out of rotation", exc)

    def _warn_key_refused(self, worker: Worker, exc: Exception) -> None:
        """A refused key never heals by itself: say so once, not only at debug level (the
        worker stayed out of rotation and clients got 503 with no reason anywhere)."""
        status = getattr(exc, "status", None)
        if status not in KEY_REFUSED_STATUSES or worker.url in self._key_refused:
            return
        self._key_refused.add(worker.url)
        log.warning(
            "%s server %s refused the router's API key (%s): it stays out of rotation until "
            "the router's --api-key is the server's",
            worker.role,
            worker.url,
            exc,
        )

    async def check_all(self) -> None:
        workers = self.registry.all()
        results = await asyncio.gather(*(self.check(w) for w in workers))
        for worker, ok in zip(workers, results, strict=True):
            if worker.health.record(ok):
                healthy = worker.health.healthy
                if healthy:
                    worker.breaker.on_back(time.monotonic())
                elif self.kv_follower is not None:
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
        """One `/get_load`; an answer for another number of ranks than the router knows
        means the server came back with another DP size: its /server_info is read anew."""
        try:
            tokens = tokens_per_rank(await self._get_json(worker.url, "/get_load"))
            if len(tokens) != worker.dp_size:
                await self.refresh_info(worker)
            worker.set_reported_load(tokens)
        except CHECK_ERRORS as exc:
            log.debug("load of %s unknown: %r", worker.url, exc)

    async def _load_loop(self) -> None:
        while True:
            workers = [w for w in self.registry.all() if w.health.healthy]
            await asyncio.gather(*(self.refresh_load(w) for w in workers))
            await asyncio.sleep(self.config.load_refresh_interval_s)

    def update_gauges(self) -> None:
        m, now = self.metrics, time.monotonic()
        for gauge in (m.healthy, m.available, m.circuit, m.in_flight):
            gauge.clear()
        for w in self.registry.all():
            m.healthy.labels(w.url, w.role).set(1 if w.health.healthy else 0)
            m.available.labels(w.url, w.role).set(1 if w.available(now) else 0)
            for state in BreakerState:
                m.circuit.labels(w.url, w.role, state.value).set(w.breaker.state is state)
            m.in_flight.labels(w.url, w.role).set(w.in_flight)
