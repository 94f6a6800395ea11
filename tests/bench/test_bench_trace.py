"""Mooncake trace parsing and send-time schedules (trace timing scaled, Poisson, gamma)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench.trace import (
    TraceRow,
    arrival_times,
    parse_trace,
    scale_lengths,
    trace_send_times,
)

ROWS = [
    {"timestamp": 1000, "input_length": 600, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 1500, "input_length": 100, "output_length": 20, "hash_ids": [1]},
    {"timestamp": 4000, "input_length": 1200, "output_length": 5, "hash_ids": [1, 2, 3]},
]


def lines() -> list[str]:
    return [json.dumps(r) + "\n" for r in ROWS]


def test_parse_trace_reads_every_field_in_file_order():
    rows = parse_trace(lines())
    assert rows[0] == TraceRow(1000.0, 600, 10, (1, 2))
    assert [r.input_length for r in rows] == [600, 100, 1200]
    assert rows[2].hash_ids == (1, 2, 3)


def test_parse_trace_skips_blank_lines_and_honours_the_limit():
    assert len(parse_trace(["\n", *lines(), "  \n"])) == 3
    assert len(parse_trace(lines(), limit=2)) == 2


def test_a_malformed_trace_line_names_its_line_number():
    with pytest.raises(ValueError, match="trace line 2"):
        parse_trace([lines()[0], '{"timestamp": 5}\n'])
    with pytest.raises(ValueError, match="trace line 1"):
        parse_trace(['{"timestamp": 0, "input_length": 0, "output_length": 1}'])


def test_trace_send_times_are_relative_and_scaled_by_speedup():
    rows = parse_trace(lines())
    assert trace_send_times(rows, 1.0) == pytest.approx([0.0, 0.5, 3.0])
    assert trace_send_times(rows, 2.0) == pytest.approx([0.0, 0.25, 1.5])
    assert trace_send_times([], 1.0) == []


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(np.random.default_rng(0), 4, math.inf, 1.0) == [0.0] * 4


def test_poisson_arrivals_have_the_requested_mean_rate():
    times = arrival_times(np.random.default_rng(0), 20000, 50.0, 1.0)
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.03)


def test_burstiness_changes_spread_not_rate():
    rng = np.random.default_rng(1)
    steady = np.diff(arrival_times(rng, 20000, 10.0, 10.0))
    bursty = np.diff(arrival_times(rng, 20000, 10.0, 0.2))
    assert steady.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.mean() == pytest.approx(0.1, rel=0.1)
    assert bursty.std() > 3 * steady.std()


def test_scaled_lengths_shrink_but_never_reach_zero():
    rows = scale_lengths(parse_trace(lines()), 0.01)
    assert [(r.input_length, r.output_length) for r in rows] == [(6, 1), (1, 1), (12, 1)]
    assert rows[0].hash_ids == (1, 2) and rows[2].timestamp_ms == 4000.0
