"""A hand-made benchmark result shared by the report, compare and CLI tests."""

from __future__ import annotations

import math

from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import RequestRecord, summarize
from pdserve.bench.report import build_result


def make_result(label: str | None, scale: float) -> dict:
    """Five requests with latencies times `scale`, and one HTTP 400."""
    records = [
        RequestRecord(
            i,
            16,
            4,
            0.1 * i,
            sent_s=0.1 * i,
            ok=True,
            ttft_s=0.02 * scale,
            itl_s=[0.01 * scale] * 3,
            e2el_s=0.05 * scale,
            output_tokens=4,
            output_tokens_from_server=True,
        )  # fmt: skip
        for i in range(5)
    ]
    records.append(RequestRecord(5, 16, 4, 0.5, sent_s=0.5, error_kind="http_400", error="long"))
    cfg = BenchConfig(label=label, slo_ttft_ms=30.0)
    summary = summarize(records, 1.0, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    return build_result(cfg, math.inf, summary, records, {"model": "m"}, {"x_total": 6.0})
