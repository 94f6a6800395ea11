"""A server's lifetime totals are Prometheus counters: `_total`, typed counter, never going
back when a worker restarts, so that rate() and increase() read them right."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pdserve.serving.metrics import ServerMetrics
from pdserve.serving.protocol import WorkerLoad


def load(num_auth_refusals: int) -> WorkerLoad:
    return WorkerLoad(
        dp_rank=0, num_running=0, num_waiting=0, num_tokens=0, num_used_pages=0,
        num_free_pages=4, num_total_pages=4, num_auth_refusals=num_auth_refusals,
    )  # fmt: skip


def counter(metrics: ServerMetrics, family: str) -> float:
    for fam in text_string_to_metric_families(metrics.render().decode()):
        if fam.name == family:
            assert fam.type == "counter", f"{family} is a {fam.type}"
            return sum(s.value for s in fam.samples if s.name == family + "_total")
    raise AssertionError(f"no family {family}")


def test_refused_kv_handshakes_and_dropped_event_batches_are_counters():
    metrics = ServerMetrics("prefill", "m")
    for reported in (3, 5, 2):  # the worker restarted after reporting 5: it counts from 0
        metrics.observe_load(load(reported))
    assert counter(metrics, "pdserve_kv_handshake_auth_refusals") == 7
    metrics.kv_events_dropped.inc(2)
    assert counter(metrics, "pdserve_kv_events_dropped_batches") == 2
