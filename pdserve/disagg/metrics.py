"""Prometheus metrics of the disaggregation layer, in the server's own registry.

Runs in the prefill or decode front end. Worker-side facts (KV bytes, transfer time,
failures) reach it through the requests' outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from pdserve.auth import ProofChecker
    from pdserve.disagg.bootstrap_registry import BootstrapRegistry
    from pdserve.serving.metrics import ServerMetrics

REQUEST_BYTES_BUCKETS = tuple(float(1 << n) for n in range(12, 34, 2))  # 4 KiB .. 8 GiB
TRANSFER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STAGES = (  # a PD request's stages, as its workers time them (ReqOutput.stage_s)
    "prefill_compute",
    "prefill_page_list_wait",
    "prefill_send",
    "decode_bootstrap",
    "decode_kv_wait",
    "decode_total",
)

FAILURE_KINDS = [
    ("conflict", "follow_bootstrap_room conflict"),
    ("explicit_rank", "disagg_prefill_dp_rank"),
    ("heartbeat", "heartbeat"),
    ("timeout", "timed out"),
    ("rank_timeout", "did not publish the dp rank"),
    ("layout_mismatch", "mismatch"),
    ("aborted", "abort"),
    ("unreachable", "unreachable"),
    ("auth", "proof"),
]


def failure_kind(message: str) -> str:
    """A small, stable label for a failure message (for the failures-by-reason counter)."""
    text = message.lower()
    for kind, needle in FAILURE_KINDS:
        if needle in text:
            return kind
    return "other"


class _RegistryCollector:
    """Exports the bootstrap registry's own counters at scrape time, with the `model_name`
    label every family of the server carries."""

    def __init__(self, registry: BootstrapRegistry, checker: ProofChecker | None, model: str):
        self.registry = registry
        self.checker = checker
        self.model = model

    def collect(self):
        if self.checker is not None:
            refusals = CounterMetricFamily(
                "pdserve_bootstrap_auth_refusals",
                "bootstrap writes refused for a missing, wrong, stale or replayed proof",
                labels=["model_name", "reason"],
            )
            for reason, count in self.checker.refused.items():
                refusals.add_metric([self.model, reason], count)
            yield refusals
        stats = self.registry.stats()
        for name, value in stats.items():
            counter = CounterMetricFamily(
                f"pdserve_bootstrap_{name}", f"bootstrap registry: {name}", labels=["model_name"]
            )
            counter.add_metric([self.model], value)
            yield counter
        rooms = GaugeMetricFamily(
            "pdserve_bootstrap_rooms", "room entries held", labels=["model_name"]
        )
        rooms.add_metric([self.model], self.registry.num_rooms)
        yield rooms


class DisaggMetrics:
    def __init__(self, metrics: ServerMetrics):
        self.server = metrics
        self.resolutions = metrics.counter(
            "rank_resolutions", "decode: prefill DP rank resolutions by path", ["path"]
        )
        self.conflicts = metrics.counter(
            "rank_conflicts",
            "prefill: requests failed by a rank rule (conflict, wrong explicit rank)",
        )
        self.query_round_trips = metrics.counter(
            "rank_query_round_trips", "decode: /query_dp_ranks requests sent"
        )
        self.rooms_queried = metrics.counter("rank_query_rooms", "decode: rooms asked about")
        self.epoch_changes = metrics.counter(
            "prefill_epoch_changes",
            "decode: prefill servers seen restarted (a new epoch); their cached info dropped",
        )
        self.failures = metrics.counter(
            "disagg_failures", "requests failed by the disaggregation layer, by reason", ["reason"]
        )
        self.kv_bytes = metrics.counter("kv_transfer_bytes", "KV bytes transferred")
        self.kv_request_bytes = metrics.histogram(
            "kv_transfer_request_bytes",
            "KV bytes sent (prefill) or received (decode) per request",
            buckets=REQUEST_BYTES_BUCKETS,
        )
        self.kv_skipped_tokens = metrics.counter(
            "kv_transfer_skipped_tokens",
            "decode: prompt tokens whose KV decode held already, so none was transferred",
        )
        self.kv_seconds = metrics.histogram(
            "kv_transfer_seconds",
            "time from page list to KV arrival (decode) or send done (prefill)",
            buckets=TRANSFER_BUCKETS_S,
        )
        self.stage_seconds = metrics.histogram(
            "disagg_stage_seconds",
            "seconds a PD request spent in each stage of this server's leg, by stage",
            ["stage"],
            buckets=TRANSFER_BUCKETS_S,
        )
        self.rooms_forwarded = metrics.counter(
            "rooms_forwarded",
            "prefill (--rank-mismatch forward): rooms dispatched off their home worker and served",
        )
        self.relay_seconds = metrics.histogram(
            "kv_relay_seconds",
            "decode: page list sent to a room's home worker -> its redirect to the serving one",
            buckets=TRANSFER_BUCKETS_S,
        )
        for path in ("explicit", "single_rank", "fast_path", "query"):
            self.resolutions.labels(path=path)  # exported as 0 before the first resolution

    def watch_registry(self, registry: BootstrapRegistry, checker: ProofChecker | None) -> None:
        self.server.registry.register(_RegistryCollector(registry, checker, self.server.model_name))

    def resolved(self, path: str) -> None:
        self.resolutions.labels(path=path).inc()

    def conflict(self, message: str) -> None:
        self.conflicts.inc()
        self.failure(failure_kind(message))

    def failure(self, kind: str) -> None:
        self.failures.labels(reason=kind).inc()

    def epoch_change(self) -> None:
        self.epoch_changes.inc()

    def query_round_trip(self, num_rooms: int) -> None:
        self.query_round_trips.inc()
        self.rooms_queried.inc(num_rooms)

    def stages(self, stage_s: dict[str, float]) -> None:
        for stage, seconds in stage_s.items():
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def transfer(self, num_bytes: int, seconds: float | None, num_skipped_tokens: int) -> None:
        """One request's KV transfer, as its side saw it (reported once per request)."""
        self.kv_bytes.inc(num_bytes)
        self.kv_request_bytes.observe(num_bytes)
        self.kv_skipped_tokens.inc(num_skipped_tokens)
        if seconds is not None:
            self.kv_seconds.observe(seconds)
