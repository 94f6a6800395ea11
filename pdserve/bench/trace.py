"""Mooncake FAST'25 trace rows and request send times (Poisson, gamma or a trace's own).

Pure: runs in the `pdserve bench` client. A trace is JSONL, one request a line:
`{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_trace(lines: Iterable[str], limit: int | None = None) -> list[TraceRow]:
    """Rows of a Mooncake JSONL trace, in file order, at most `limit` of them. Blank lines
    are skipped; a malformed line raises ValueError naming its line number."""
    rows: list[TraceRow] = []
    for line_no, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            row = TraceRow(
                timestamp_ms=float(obj["timestamp"]),
                input_length=int(obj["input_length"]),
                output_length=int(obj["output_length"]),
                hash_ids=tuple(int(h) for h in obj.get("hash_ids", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"trace line {line_no}: {exc!r}") from exc
        if row.input_length < 1 or row.output_length < 1:
            raise ValueError(f"trace line {line_no}: lengths must be >= 1")
        rows.append(row)
    return rows


def scale_lengths(rows: Sequence[TraceRow], factor: float) -> list[TraceRow]:
    """Rows with input and output lengths times `factor` (at least one token each), so that
    a trace of long prompts fits a small model; use a block size times `factor` with them
    to keep the trace's sharing pattern."""
    return [
        replace(
            row,
            input_length=max(1, round(row.input_length * factor)),
            output_length=max(1, round(row.output_length * factor)),
        )
        for row in rows
    ]


def trace_send_times(rows: Sequence[TraceRow], speedup: float) -> list[float]:
    """Send time of each row in seconds after the first row's, divided by `speedup`.
    Rows keep their file order; a timestamp earlier than the first one's clamps to 0."""
    if not rows:
        return []
    start_ms = rows[0].timestamp_ms
    return [max(0.0, (row.timestamp_ms - start_ms) / 1000.0 / speedup) for row in rows]


def arrival_times(
    rng: np.random.Generator, count: int, rate: float, burstiness: float
) -> list[float]:
    """Send times in seconds from the start: gamma-distributed gaps with mean 1/rate and
    shape `burstiness` (1.0 is a Poisson process); an infinite rate sends everything at 0."""
    if math.isinf(rate):
        return [0.0] * count
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=count)
    # the first request goes at once: a run starts with traffic, not with an idle gap
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]
