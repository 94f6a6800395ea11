"""Prometheus metrics of the router (router process). One registry per router instance, so
several routers can live in one process (tests) without clashing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Router-added latency is small: resolve well below a millisecond.
ADDED_LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_router_requests", "Client requests by route", ["route"], registry=r
        )
        self.failures = Counter(
            "pdserve_router_request_failures",
            "Client requests that ended in an error, by reason",
            ["route", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "pdserve_router_retries", "Attempts after the first, by route", ["route"], registry=r
        )
        self.worker_requests = Counter(
            "pdserve_router_worker_requests",
            "Legs sent to each worker",
            ["worker", "role"],
            registry=r,
        )
        self.worker_failures = Counter(
            "pdserve_router_worker_failures",
            "Legs that failed on each worker, by reason",
            ["worker", "role", "reason"],
            registry=r,
        )
        self.aborts = Counter(
            "pdserve_router_aborts",
            "Legs aborted by the router, by cause",
            ["role", "cause"],
            registry=r,
        )
        self.added_latency = Histogram(
            "pdserve_router_added_latency_seconds",
            "Time the router adds: whole request minus the decode leg's own time",
            ["route"],
            buckets=ADDED_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "pdserve_router_request_duration_seconds",
            "Whole request as the client sees it",
            ["route"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.healthy = Gauge(
            "pdserve_router_worker_healthy",
            "1 while the worker is healthy",
            ["worker", "role"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pdserve_router_worker_in_flight",
            "Legs in flight per worker",
            ["worker", "role"],
            registry=r,
        )

        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):  # noqa: ANN001, ANN201 - any labelled metric
        """`metric.labels(*labels)`, cached: the per-request paths call this several times."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
