"""A run's result as one JSON-ready dict, and the table printed on the terminal.

Pure formatting (no I/O besides `write_json`): runs in the `pdserve bench` client.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Sequence
from typing import Any

from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import LATENCIES, PERCENTILES, RequestRecord

RESULT_VERSION = 1
_LATENCY_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def _json_number(value: Any) -> Any:
    """inf is not JSON: a rate of inf is written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    """The run's configuration as written to the result JSON. A credential (a field kept
    out of repr: --api-key) says only whether it was set: results get shared and committed."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        out[field.name] = _json_number(value) if field.repr else ("<set>" if value else None)
    return out


def record_dict(record: RequestRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["tpot_s"] = record.tpot_s
    return out


def build_result(
    cfg: BenchConfig,
    rate: float,
    summary: dict[str, Any],
    records: Sequence[RequestRecord],
    info: dict[str, Any],
    server_counters: dict[str, float] | None,
) -> dict[str, Any]:
    """Everything about one run: identity, configuration, every figure, what the server
    counted, vLLM-style per-request arrays, and the full per-request records."""
    config = config_dict(cfg)
    done = [r for r in records if r.ok]
    return {
        "version": RESULT_VERSION,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "label": cfg.label,
        "backend": "pdserve-bench",
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "dataset_name": cfg.dataset_name,
        "request_rate": _json_number(rate),
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        **info,
        **summary,
        "server_counters": server_counters,
        "config": config,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens for r in records],
        "ttfts": [r.ttft_s for r in records],
        "itls": [r.itl_s for r in records],
        "errors": [r.error or "" for r in records],
        "num_itl_samples": sum(len(r.itl_s) for r in done),
        "requests": [record_dict(r) for r in records],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The terminal report, laid out like `vllm bench serve`'s."""
    width = 60
    lines = [" Serving Benchmark Result ".center(width, "=")]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<44}{_fmt(value):>16}")

    row("Label:", result.get("label"))
    row("Endpoint:", result.get("endpoint"))
    row("Request rate (req/s):", result.get("request_rate"))
    row("Max concurrency:", result.get("max_concurrency"))
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    for reason, count in sorted(result["failed_by_reason"].items()):
        row(f"  {reason}:", count)
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Input token throughput (tok/s):", result["input_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    if result.get("slo_ttft_ms") is not None or result.get("slo_tpot_ms") is not None:
        row(
            "SLO TTFT / TPOT (ms):",
            f"{_fmt(result['slo_ttft_ms'])} / {_fmt(result['slo_tpot_ms'])}",
        )
        row("Goodput share (requests within SLO):", result["goodput_share"])
        row("Request goodput (req/s):", result["request_goodput"])
    for name in LATENCIES:
        lines.append(f" {_LATENCY_TITLES[name]} ".center(width, "-"))
        row(f"Mean {name.upper()} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", result[f"median_{name}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {name.upper()} (ms):", result[f"p{p}_{name}_ms"])
    if result.get("disagg_stages"):
        lines.append(" PD stages, mean (ms) [count] ".center(width, "-"))
        for stage, fig in result["disagg_stages"].items():
            row(f"{stage}:", f"{fig['mean_ms']:.1f} [{fig['count']}]")
    lines.append("=" * width)
    return "\n".join(lines)


def _mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.2f}"


def format_turn_table(result: dict[str, Any]) -> str:
    """The multi-turn part of the report: latency percentiles and cached share per turn
    group ("1", "2", ..., and "2+"), then the cache and KV transfer totals."""
    groups = list(result["per_turn"])
    head = f"{'turn':<6}{'done':>6}" + "".join(
        f"{f'{name} p{p}':>11}" for name in ("ttft", "itl", "e2el") for p in PERCENTILES
    )
    lines = [" Per turn (ms) ".center(len(head) + 8, "-"), head + f"{'cached':>8}"]
    for group in groups:
        fig = result["per_turn"][group]
        cells = "".join(
            f"{_fmt(fig[f'p{p}_{name}_ms']):>11}" for name in ("ttft", "itl", "e2el") for p in PERCENTILES
        )  # fmt: skip
        share = f"{fig['cached_token_share']:.3f}"
        lines.append(f"{group:<6}{fig['completed']:>6}{cells}{share:>8}")
    lines.append(f"Cached tokens / prompt tokens: {result['cached_tokens']} / "
                 f"{result['prompt_tokens']} = {result['cached_token_share']:.3f}")  # fmt: skip
    kv = result.get("kv_transfer")
    if kv is None:
        lines.append("KV bytes transferred: - (give --metrics-urls of the servers)")
    else:
        lines.append(
            f"KV bytes transferred (MiB): {_mib(kv['kv_transfer_bytes'])} "
            f"(sent by prefill {_mib(kv['kv_bytes_sent'])}, "
            f"received by decode {_mib(kv['kv_bytes_received'])})"
        )
    return "\n".join(lines)


def without_records(result: dict[str, Any]) -> dict[str, Any]:
    """The result less its per-request parts (for sweep summaries)."""
    bulky = {"requests", "input_lens", "output_lens", "ttfts", "itls", "errors"}
    return {k: v for k, v in result.items() if k not in bulky}


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
