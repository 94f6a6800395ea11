"""`pdserve bench compare A.json B.json`: two (or more) runs side by side, as a table with
each run's ratio to the first, and as overlaid latency CDFs. Runs in the client; files only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from pdserve.bench.metrics import LATENCIES, PERCENTILES

SUMMARY_FIELDS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "goodput_share",
    "request_goodput",
]
LATENCY_FIELDS = [
    f"{stat}_{name}_ms"
    for name in LATENCIES
    for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES))
]


def load_run(path: str) -> tuple[str, dict[str, Any]]:
    """(label, result): the run's own label, else its file name without `.json`."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    if "completed" not in result:
        raise ValueError(f"{path} is not a pdserve bench result (no 'completed' field)")
    return result.get("label") or os.path.splitext(os.path.basename(path))[0], result


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio(value: Any, base: Any) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, base))
    if not numbers or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def compare_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """Header, then one row per figure: name, each run's value, and each later run's ratio
    to the first run."""
    labels = [label for label, _ in runs]
    header = ["metric", *labels, *(f"{lab}/{labels[0]}" for lab in labels[1:])]
    rows = [header]
    base = runs[0][1]
    for name in SUMMARY_FIELDS + LATENCY_FIELDS:
        values = [result.get(name) for _, result in runs]
        ratios = [_ratio(v, base.get(name)) for v in values[1:]]
        rows.append([name, *(_cell(v) for v in values), *ratios])
    return rows


def format_compare(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    rows = compare_rows(runs)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
