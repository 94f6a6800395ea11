"""Percentiles, throughput and goodput computed from hand-made request records."""

from __future__ import annotations

import pytest

from pdserve.bench.metrics import RequestRecord, latency_stats, summarize


def done(index: int, ttft_ms: float, e2el_ms: float, out: int, prompt: int = 10) -> RequestRecord:
    gaps = [(e2el_ms - ttft_ms) / 1e3 / (out - 1)] * (out - 1) if out > 1 else []
    return RequestRecord(
        index, prompt, out, 0.0, sent_s=0.0, ok=True, ttft_s=ttft_ms / 1e3, itl_s=gaps,
        e2el_s=e2el_ms / 1e3, output_tokens=out, output_tokens_from_server=True,
    )  # fmt: skip


def failed(index: int, kind: str) -> RequestRecord:
    return RequestRecord(index, 10, 5, 0.0, sent_s=0.0, error_kind=kind, error="boom")


def test_latency_stats_interpolate_percentiles_linearly_in_ms():
    stats = latency_stats("ttft", [0.010, 0.020, 0.030, 0.040, 0.050])
    assert stats["mean_ttft_ms"] == pytest.approx(30.0)
    assert stats["median_ttft_ms"] == pytest.approx(30.0)
    assert stats["p50_ttft_ms"] == pytest.approx(30.0)
    assert stats["p90_ttft_ms"] == pytest.approx(46.0)
    assert stats["p99_ttft_ms"] == pytest.approx(49.6)
    assert stats["std_ttft_ms"] == pytest.approx(14.142, abs=1e-3)


def test_latency_stats_of_nothing_are_none():
    assert set(latency_stats("itl", []).values()) == {None}


def test_tpot_excludes_the_first_token_and_needs_two_tokens():
    assert done(0, 100, 500, 5).tpot_s == pytest.approx(0.1)
    assert done(1, 100, 100, 1).tpot_s is None
    assert failed(2, "http_400").tpot_s is None


def test_summary_counts_tokens_of_completed_requests_only():
    records = [
        done(0, 10, 110, 11, prompt=7),
        done(1, 20, 220, 21, prompt=9),
        failed(2, "http_400"),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s["completed"], s["failed"], s["num_requests"]) == (2, 1, 3)
    assert s["total_input_tokens"] == 16
    assert s["total_output_tokens"] == 32
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["input_throughput"] == pytest.approx(8.0)
    assert s["output_throughput"] == pytest.approx(16.0)
    assert s["total_token_throughput"] == pytest.approx(24.0)
    assert s["mean_tpot_ms"] == pytest.approx(10.0)
    assert s["mean_itl_ms"] == pytest.approx(10.0)  # ITL pooled over 10 + 20 gaps
    assert s["mean_e2el_ms"] == pytest.approx(165.0)
    assert s["output_tokens_from_server"] is True


def test_failures_are_grouped_by_reason():
    records = [
        failed(0, "http_400"),
        failed(1, "connection"),
        failed(2, "http_400"),
        done(3, 1, 2, 2),
    ]
    assert summarize(records, 1.0)["failed_by_reason"] == {"http_400": 2, "connection": 1}


def test_goodput_needs_both_slos_and_counts_failures_against_the_share():
    records = [
        done(0, 50, 150, 11),  # ttft 50, tpot 10: good
        done(1, 300, 400, 11),  # ttft too slow
        done(2, 50, 550, 11),  # tpot 50: too slow
        done(3, 50, 50, 1),  # one token: no TPOT, meets the TPOT limit
        failed(4, "timeout"),
    ]
    s = summarize(records, 2.0, slo_ttft_ms=100, slo_tpot_ms=20)
    assert s["good_requests"] == 2
    assert s["goodput_share"] == pytest.approx(2 / 5)
    assert s["request_goodput"] == pytest.approx(1.0)


def test_without_slos_every_completed_request_is_good():
    s = summarize([done(0, 900, 9000, 3), failed(1, "timeout")], 1.0)
    assert s["goodput_share"] == pytest.approx(0.5)


def test_an_empty_run_has_zero_rates_and_no_latencies():
    s = summarize([], 0.0)
    assert s["completed"] == 0 and s["request_throughput"] == 0.0
    assert s["mean_ttft_ms"] is None and s["goodput_share"] == 0.0
