"""The router's view of its workers: role, bootstrap port, DP size, health, breaker, load
(router process; pure: the shell feeds it check results, loads and request outcomes)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from pdserve.router.config import ROLES, Role, RouterConfig, WorkerSpec
from pdserve.router.health import CircuitBreaker, HealthState


@dataclass
class Worker:
    spec: WorkerSpec
    health: HealthState
    breaker: CircuitBreaker
    dp_size: int = 1
    # Last /get_load answer, one entry per DP rank (tokens held by running + waiting requests).
    reported_tokens: list[int] = field(default_factory=list)
    # Prompt tokens the router sent since that answer: the report cannot include them yet.
    tokens_since_report: int = 0
    in_flight: int = 0
    in_flight_per_rank: list[int] = field(default_factory=lambda: [0])
    # Tokens of the legs in flight from this router, exact and fresh unlike a report: the
    # prompt tokens each leg makes the server compute or receive (its prompt less what
    # kv_aware saw cached there).
    tokens_in_flight: int = 0
    tokens_in_flight_per_rank: list[int] = field(default_factory=lambda: [0])
    _next_rank: int = 0

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def role(self) -> Role:
        return self.spec.role

    def available(self, now: float) -> bool:
        return self.health.healthy and self.breaker.allows(now)

    def probing(self, now: float) -> bool:
        """Healthy, and held out only while its breaker's probe is in flight."""
        return self.health.healthy and self.breaker.probing(now)

    def load(self) -> int:
        """Estimated tokens on the server now."""
        return sum(self.reported_tokens) + self.tokens_since_report

    def rank_load(self, rank: int) -> int:
        """Tokens in flight on the rank: those sent to it, and a share of those the server's
        own DP controller placed."""
        per_rank = self.tokens_in_flight_per_rank
        on_rank = per_rank[rank] if rank < len(per_rank) else 0
        return on_rank + (self.tokens_in_flight - sum(per_rank)) // self.dp_size

    def set_dp_size(self, dp_size: int) -> None:
        """The server's DP size, first learned or changed by a restart. Ranks kept keep their
        legs in flight; a leg on a rank that is gone ends uncounted (`on_done` skips ranks
        out of range), its tokens still leaving `tokens_in_flight`."""
        if dp_size < 1:
            raise ValueError(f"{self.url}: dp_size must be >= 1, got {dp_size}")
        if dp_size == self.dp_size and len(self.in_flight_per_rank) == dp_size:
            return
        self.dp_size = dp_size
        self.in_flight_per_rank = _resized(self.in_flight_per_rank, dp_size)
        self.tokens_in_flight_per_rank = _resized(self.tokens_in_flight_per_rank, dp_size)
        if len(self.reported_tokens) != dp_size:  # a report of the old ranks
            self.reported_tokens = []
        self._next_rank = 0

    def set_reported_load(self, tokens_per_rank: list[int]) -> None:
        self.reported_tokens = list(tokens_per_rank)
        self.tokens_since_report = 0

    def choose_rank(self) -> int:
        """The DP rank with the fewest requests in flight from this router, then the least
        reported tokens; ties rotate so an idle server's ranks are used in turn."""
        n = self.dp_size
        reported = self.reported_tokens if len(self.reported_tokens) == n else [0] * n
        order = [(self._next_rank + i) % n for i in range(n)]
        rank = min(order, key=lambda r: (self.in_flight_per_rank[r], reported[r]))
        self._next_rank = (rank + 1) % n
        return rank

    def on_dispatch(
        self, now: float, prompt_tokens: int, rank: int | None, leg_tokens: int | None = None
    ) -> None:
        """`leg_tokens`: what the leg adds to `tokens_in_flight` (default: the prompt)."""
        leg_tokens = prompt_tokens if leg_tokens is None else leg_tokens
        self.breaker.on_dispatch(now)
        self.in_flight += 1
        self.tokens_since_report += prompt_tokens
        self.tokens_in_flight += leg_tokens
        if rank is not None and rank < len(self.in_flight_per_rank):
            self.in_flight_per_rank[rank] += 1
            self.tokens_in_flight_per_rank[rank] += leg_tokens

    def on_done(self, now: float, ok: bool | None, rank: int | None, leg_tokens: int = 0) -> None:
        """`ok` None: ended without a verdict on this worker (aborted because of its peer).
        `leg_tokens`: as given to `on_dispatch`."""
        self.in_flight = max(0, self.in_flight - 1)
        self.tokens_in_flight = max(0, self.tokens_in_flight - leg_tokens)
        if rank is not None and rank < len(self.in_flight_per_rank):
            self.in_flight_per_rank[rank] = max(0, self.in_flight_per_rank[rank] - 1)
            per_rank = self.tokens_in_flight_per_rank
            per_rank[rank] = max(0, per_rank[rank] - leg_tokens)
        if ok is None:
            self.breaker.release()
        else:
            self.breaker.record(ok, now)

    def describe(self, now: float) -> dict:
        return {
            "url": self.url,
            "role": self.role,
            "bootstrap_port": self.spec.bootstrap_port,
            "dp_size": self.dp_size,
            "healthy": self.health.healthy,
            "circuit": self.breaker.state.value,
            "available": self.available(now),
            "in_flight": self.in_flight,
            "tokens_in_flight": self.tokens_in_flight,  # kv_aware's load term, summed
            # null while no /get_load came: round_robin and random poll none, and the tokens
            # sent since start only grew
            "load_tokens": self.load() if self.reported_tokens else None,
        }


def stuck_reasons(workers: Collection[Worker]) -> str:
    """ ": <reason>; <reason>" for the workers out for a cause no retry heals, or ""."""
    reasons = sorted({w.health.stuck_reason for w in workers if w.health.stuck_reason})
    return ": " + "; ".join(reasons) if reasons else ""


def _resized(per_rank: list[int], size: int) -> list[int]:
    return per_rank[:size] + [0] * (size - len(per_rank))


class WorkerRegistry:
    """All workers by URL. Order of insertion is kept: round robin walks it."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self._workers: dict[str, Worker] = {}
        # Per role, rebuilt on add/remove: every request reads them.
        self._by_role: dict[Role, tuple[Worker, ...]] = {}

    def new_worker(self, spec: WorkerSpec, dp_size: int = 1, healthy: bool = False) -> Worker:
        c = self.config
        worker = Worker(
            spec=spec,
            health=HealthState(c.health_failure_threshold, c.health_success_threshold, healthy),
            breaker=CircuitBreaker(c.cb_failure_threshold, c.cb_success_threshold, c.cb_open_s),
        )
        worker.set_dp_size(dp_size)
        return worker

    def add(self, worker: Worker) -> None:
        if worker.url in self._workers:
            raise ValueError(f"worker {worker.url} is already registered")
        self._workers[worker.url] = worker
        self._index_roles()

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url.rstrip("/"), None)
        self._index_roles()
        return worker

    def _index_roles(self) -> None:
        workers = self._workers.values()
        self._by_role = {role: tuple(w for w in workers if w.role == role) for role in ROLES}

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url.rstrip("/"))

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def by_role(self, role: Role) -> tuple[Worker, ...]:
        return self._by_role.get(role, ())

    def available(self, role: Role, now: float, exclude: Collection[str] = ()) -> list[Worker]:
        return [w for w in self.by_role(role) if w.available(now) and w.url not in exclude]

    def probing(self, role: Role, now: float) -> list[Worker]:
        return [w for w in self.by_role(role) if w.probing(now)]

    def ready(self, now: float) -> bool:
        """At least one healthy worker for every role the router needs."""
        if self.by_role("regular"):
            return bool(self.available("regular", now))
        return bool(self.available("prefill", now)) and bool(self.available("decode", now))
