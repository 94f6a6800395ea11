"""Prometheus metrics of one server, in a registry of its own. Runs in the front end.

The disaggregation layer adds its metrics to the same registry through `counter`, `gauge`
and `histogram` (reachable as `controller.metrics`), so GET /metrics shows everything.

Every family carries a `model_name` label, the name /v1/models reports first, as vLLM's and
SGLang's do: dashboards built for them select on it.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from pdserve.serving.protocol import WorkerLoad

PREFIX = "pdserve_"
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ModelFamily:
    """A family whose first label, `model_name`, is filled in: `.labels(...)` takes only the
    family's own labels, positionally or by name, as on a plain prometheus_client metric."""

    def __init__(self, family: MetricWrapperBase, model_name: str):
        self.family = family
        self.model_name = model_name

    def labels(self, *values: object, **named: object):
        if named:
            return self.family.labels(model_name=self.model_name, **named)
        return self.family.labels(self.model_name, *values)


class ServerMetrics:
    def __init__(self, mode: str, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name  # ServerConfig.served_model_name
        self.requests = self.counter("requests", "finished requests by outcome", ["status"])
        self.prompt_tokens = self.counter("prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = self.counter("generation_tokens", "generated tokens")
        self.cached_tokens = self.counter("cached_tokens", "prompt tokens served from the KV cache")
        self.ttft_s = self.histogram("time_to_first_token_seconds", "time to first token")
        self.itl_s = self.histogram("inter_token_latency_seconds", "time between output tokens")
        self.e2e_s = self.histogram("e2e_request_latency_seconds", "request latency end to end")
        self.running = self.gauge("num_running_reqs", "running requests", ["dp_rank"])
        self.waiting = self.gauge("num_waiting_reqs", "waiting requests", ["dp_rank"])
        self.tokens = self.gauge("num_tokens", "tokens held by live requests", ["dp_rank"])
        self.pages_used = self.gauge("kv_pages_used", "KV pages in use", ["dp_rank"])
        self.pages_free = self.gauge(
            "kv_pages_free", "KV pages free or holding evictable cache", ["dp_rank"]
        )
        self.disagg_rooms = self.gauge(
            "num_disagg_rooms", "PD rooms whose KV transfer has not ended", ["dp_rank"]
        )
        self.kv_peers = self.gauge(
            "num_kv_peers", "decode: prefill workers it keeps a KV connection to", ["dp_rank"]
        )
        self.pages_cached = self.gauge(
            "kv_pages_cached", "KV pages in the prefix cache", ["dp_rank"]
        )
        self.pages_evictable = self.gauge(
            "kv_pages_evictable", "cached KV pages no request pins", ["dp_rank"]
        )
        self.cache_lookup_tokens = self.counter(
            "prefix_cache_lookup_tokens", "prompt tokens looked up in the prefix cache", ["dp_rank"]
        )
        self.cache_hit_tokens = self.counter(
            "prefix_cache_hit_tokens", "prompt tokens found in the prefix cache", ["dp_rank"]
        )
        self.cache_hit_rate = self.gauge(
            "prefix_cache_hit_rate", "hit tokens / lookup tokens since start", ["dp_rank"]
        )
        self.cache_evicted_pages = self.counter(
            "prefix_cache_evicted_pages", "cached KV pages evicted", ["dp_rank"]
        )
        self.preemptions = self.counter(
            "num_preemptions",
            "running requests preempted for KV pages (their KV is recomputed later)",
            ["dp_rank"],
        )
        # Lifetime totals are counters (`_total`), so that rate() and resets read right; they
        # were gauges.
        self.kv_events_dropped = self.counter(
            "kv_events_dropped_batches",
            "KV event batches dropped because the publish queue was full (subscribers heal "
            "by replay or snapshot)",
        )
        self._last_load: dict[str, WorkerLoad] = {}
        self.auth_refusals = self.counter(
            "auth_refusals",
            "requests and peers refused for a missing or wrong credential",
            ["kind"],
        )
        self.kv_auth_refusals = self.counter(
            "kv_handshake_auth_refusals", "KV handshakes refused for a wrong proof", ["dp_rank"]
        )
        self.gauge("server_info", "constant 1, labelled with the server mode", ["mode"]).labels(
            mode
        ).set(1)

    def counter(self, name: str, doc: str, labels: list[str] | None = None):
        return self._family(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: list[str] | None = None):
        return self._family(Gauge, name, doc, labels)

    def histogram(
        self, name: str, doc: str, labels: list[str] | None = None, buckets=_LATENCY_BUCKETS_S
    ):
        return self._family(Histogram, name, doc, labels, buckets=buckets)

    def _family(
        self, kind: type[MetricWrapperBase], name: str, doc: str, labels: list[str] | None, **kw
    ):
        """A family labelled `model_name` first (prometheus_client has no constant labels).
        With no labels of its own it has one series, returned as is: exported at 0 from the
        start, `.inc()`, `.set()`, `.observe()` work on it. Otherwise its `.labels()` is
        filled in by a ModelFamily."""
        all_labels = ["model_name", *(labels or [])]
        family = kind(PREFIX + name, doc, all_labels, registry=self.registry, **kw)
        if labels:
            return ModelFamily(family, self.model_name)
        return family.labels(self.model_name)

    def observe_load(self, load: WorkerLoad) -> None:
        rank = str(load.dp_rank)
        self.running.labels(rank).set(load.num_running)
        self.waiting.labels(rank).set(load.num_waiting)
        self.tokens.labels(rank).set(load.num_tokens)
        self.pages_used.labels(rank).set(load.num_used_pages)
        self.pages_free.labels(rank).set(load.num_free_pages)
        self.disagg_rooms.labels(rank).set(load.num_disagg_rooms)
        self.kv_peers.labels(rank).set(load.num_kv_peers)
        self.pages_cached.labels(rank).set(load.num_cached_pages)
        self.pages_evictable.labels(rank).set(load.num_evictable_pages)
        last = self._last_load.get(rank)
        self._last_load[rank] = load
        for counter, field in (
            (self.cache_lookup_tokens, "cache_lookup_tokens"),
            (self.cache_hit_tokens, "cache_hit_tokens"),
            (self.cache_evicted_pages, "cache_evicted_pages"),
            (self.preemptions, "num_preemptions"),
            (self.kv_auth_refusals, "num_auth_refusals"),
        ):
            # Workers report lifetime totals; a restarted worker starts again from 0.
            before = getattr(last, field) if last else 0
            now = getattr(load, field)
            counter.labels(rank).inc(now - before if now >= before else now)
        if load.cache_lookup_tokens:
            rate = load.cache_hit_tokens / load.cache_lookup_tokens
            self.cache_hit_rate.labels(rank).set(rate)

    def observe_finished(
        self, status: str, prompt_tokens: int, output_tokens: int, cached_tokens: int, e2e_s: float
    ) -> None:
        self.requests.labels(status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.e2e_s.observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
