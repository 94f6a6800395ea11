"""Prometheus metrics of the router (router process). One registry per router instance, so
several routers can live in one process (tests) without clashing. The series touched on every
request are plain numbers turned into metric families only when scraped: prometheus_client's
own objects take a lock and several calls per update."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Router-added latency is small: resolve well below a millisecond.
ADDED_LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
MATCHED_TOKENS_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class HotCounter(Collector):
    """A labelled counter: `inc(*label_values)` is one dict update."""

    def __init__(self, name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry):
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *label_values: str) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + 1.0

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for label_values, value in list(self.values.items()):
            family.add_metric(list(label_values), value)
        yield family


class HotHistogram(Collector):
    """A labelled histogram: `observe(value, *label_values)` counts into one bucket."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = list(buckets)  # upper bounds; a last bucket (+Inf) is implicit
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        registry.register(self)

    def observe(self, value: float, *label_values: str) -> None:
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = ([0] * (len(self.bounds) + 1), [0.0])
        counts, total = series
        counts[bisect.bisect_left(self.bounds, value)] += 1  # `le` bounds are inclusive
        total[0] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for label_values, (counts, total) in list(self.series.items()):
            cumulative, buckets = 0, []
            bounds = [floatToGoString(float(b)) for b in self.bounds] + ["+Inf"]
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(label_values), buckets, total[0])
        yield family


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = HotCounter(
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
        self.worker_requests = HotCounter(
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
        self.added_latency = HotHistogram(
            "pdserve_router_added_latency_seconds",
            "Time the router adds: whole request minus the decode leg's own time",
            ["route"],
            buckets=ADDED_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.duration = HotHistogram(
            "pdserve_router_request_duration_seconds",
            "Whole request as the client sees it",
            ["route"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.auth_refusals = Counter(
            "pdserve_router_auth_refusals",
            "Client requests refused for a missing or wrong API key",
            registry=r,
        )
        self.kv_matched_tokens = HotHistogram(
            "pdserve_router_kv_matched_tokens",
            "kv_aware: prompt tokens the chosen server held, as the router's index saw them",
            ["role"],
            buckets=MATCHED_TOKENS_BUCKETS,
            registry=r,
        )
        self.request_paths = HotCounter(
            "pdserve_router_request_paths",
            "PD requests by path: disaggregated (prefill + decode) or local (decode alone)",
            ["path"],
            registry=r,
        )
        self.healthy = Gauge(
            "pdserve_router_worker_healthy",
            "1 while the worker is healthy",
            ["worker", "role"],
            registry=r,
        )
        self.available = Gauge(
            "pdserve_router_worker_available",
            "1 while the worker takes requests (healthy, and its circuit breaker lets them by)",
            ["worker", "role"],
            registry=r,
        )
        self.circuit = Gauge(
            "pdserve_router_worker_circuit",
            "1 for the worker's circuit breaker state (closed, open, half_open), 0 for the others",
            ["worker", "role", "state"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pdserve_router_worker_in_flight",
            "Legs in flight per worker",
            ["worker", "role"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
