"""Per-request records and the figures computed from them: throughput, latency percentiles,
goodput. Pure (no I/O, no clock): runs in the `pdserve bench` client after a run.
Field names follow `vllm bench serve` so that its users can read them as they are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """What one request did. Times are seconds from the start of the measured run."""

    index: int
    prompt_len: int  # tokens sent (server's count when it reported one)
    output_len_requested: int
    scheduled_s: float  # when the workload wanted it sent
    sent_s: float | None = None  # when it was actually sent (after any concurrency wait)
    ok: bool = False
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    e2el_s: float | None = None
    output_tokens: int = 0  # server's count (meta_info / usage) when it gave one
    output_tokens_from_server: bool = False
    cached_tokens: int | None = None  # prompt tokens the server served from its cache
    output_ids: list[int] | None = None  # the answer's token ids (native /generate only)
    output_text: str | None = None  # the answer's text as streamed
    # per answer token, [[logprob, token_id, text], ...] best first, when the request asked
    # for them (native `return_logprob` with `top_logprobs_num`)
    output_top_logprobs: list[list[list[Any]] | None] | None = None
    error_kind: str | None = None  # short reason: "http_400", "connection", "timeout", ...
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2el_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def meets_slo(self, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
        """Completed, and within both limits (a missing limit always holds; a one-token
        output has no TPOT and so meets any TPOT limit)."""
        if not self.ok:
            return False
        if slo_ttft_ms is not None and (self.ttft_s is None or self.ttft_s * 1e3 > slo_ttft_ms):
            return False
        tpot = self.tpot_s
        return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms


def latency_stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of `values_s`, in milliseconds, keyed like `mean_ttft_ms`.
    Percentiles interpolate linearly (numpy's default, as vLLM does); empty gives None."""
    out: dict[str, float | None] = {}
    arr = np.asarray(values_s, dtype=float) * 1e3
    empty = arr.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(arr.mean())
    out[f"median_{name}_ms"] = None if empty else float(np.median(arr))
    out[f"std_{name}_ms"] = None if empty else float(arr.std())
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per latency kind over the completed requests (ITL pooled over all of them)."""
    done = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [t for t in (r.tpot_s for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2el_s for r in done if r.e2el_s is not None],
    }


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """Every aggregate figure of a run. Tokens count completed requests only; goodput counts
    requests that completed within both SLOs, as a share of all requests and per second."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    good = sum(r.meets_slo(slo_ttft_ms, slo_tpot_ms) for r in records)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "failed_by_reason": dict(Counter(r.error_kind or "unknown" for r in failed)),
        "duration": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_tokens_from_server": all(r.output_tokens_from_server for r in done),
        "request_throughput": len(done) * per_s,
        "input_throughput": total_in * per_s,
        "output_throughput": total_out * per_s,
        "total_token_throughput": (total_in + total_out) * per_s,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "good_requests": good,
        "goodput_share": good / len(records) if records else 0.0,
        "request_goodput": good * per_s,
    }
    for name, values in latency_samples(records).items():
        out.update(latency_stats(name, values))
    return out
