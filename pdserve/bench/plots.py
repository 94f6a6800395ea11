"""PNG plots of benchmark results (matplotlib, Agg backend), in the `pdserve bench` client:
latency CDFs, TTFT and ITL over the run, a sweep's goodput per rate, runs compared (CDFs,
or bars of their headline figures).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def samples_ms(result: dict[str, Any]) -> dict[str, list[float]]:
    """Milliseconds per latency kind over a result's completed requests. A result without
    per-request records (`vllm bench serve --save-result`) has TTFT and ITL arrays only."""
    if "requests" not in result:
        ok = [not error for error in result.get("errors") or []]
        ttfts = zip(result.get("ttfts") or [], ok, strict=False)
        itls = zip(result.get("itls") or [], ok, strict=False)
        return {
            "ttft": [t * 1e3 for t, good in ttfts if good and t is not None],
            "tpot": [],
            "itl": [gap * 1e3 for gaps, good in itls if good for gap in gaps],
            "e2el": [],
        }
    done = [r for r in result["requests"] if r["ok"]]
    return {
        "ttft": [r["ttft_s"] * 1e3 for r in done if r["ttft_s"] is not None],
        "tpot": [r["tpot_s"] * 1e3 for r in done if r["tpot_s"] is not None],
        "itl": [gap * 1e3 for r in done for gap in r["itl_s"]],
        "e2el": [r["e2el_s"] * 1e3 for r in done if r["e2el_s"] is not None],
    }


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as step points (drawn with where="post"): it starts at share 0 at
    the smallest value and reaches 1 at the largest."""
    xs = sorted(values)
    if not xs:
        return [], []
    return [xs[0], *xs], [0.0, *(i / len(xs) for i in range(1, len(xs) + 1))]


def slo_limits_ms(result: dict[str, Any]) -> dict[str, float]:
    """The run's SLO limits by latency kind ("ttft", "tpot"), for those that were set."""
    limits = {"ttft": result.get("slo_ttft_ms"), "tpot": result.get("slo_tpot_ms")}
    return {name: ms for name, ms in limits.items() if ms is not None}


def run_title(result: dict[str, Any]) -> str:
    """The run's label (or "unlabelled run"), what it measured, and its SLO limits."""
    rate = result.get("request_rate")
    pace = f"{rate} req/s" if rate is not None else "multi-turn"  # conversations pace themselves
    parts = [f"{result.get('endpoint')} @ {pace}", f"{result.get('completed')} requests"]
    limits = slo_limits_ms(result)
    if limits:
        parts.append(
            "SLO " + ", ".join(f"{_NAMES[name]} <= {ms:g} ms" for name, ms in limits.items())
        )
    return f"{result.get('label') or 'unlabelled run'}: " + "; ".join(parts)


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def cdf_figure(
    runs: Sequence[tuple[str | None, dict[str, Any]]],
    title: str | None = None,
    slo_ms: dict[str, float] | None = None,
) -> Any:
    """One CDF panel per latency kind, a curve per run; SLO limits as dashed lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, kind) in zip(axes.flat, _NAMES.items(), strict=True):
        for label, result in runs:
            xs, ys = cdf_points(samples_ms(result)[name])
            if xs:
                ax.step(xs, ys, where="post", label=label)
        if slo_ms and name in slo_ms:
            ax.axvline(slo_ms[name], linestyle="--", color="red", label=f"SLO {slo_ms[name]:g} ms")
        ax.set_title(f"{kind} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("share of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def scatter_figure(
    xs: Sequence[float],
    ys: Sequence[float],
    title: str,
    ylabel: str,
    limit_ms: float | None = None,
    xlabel: str = "time since start of run (s)",
) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.scatter(xs, ys, s=6)
    if limit_ms is not None:
        ax.axhline(limit_ms, linestyle="--", color="red", label=f"SLO {limit_ms:g} ms")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def itl_points(result: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(arrival time of each token chunk after the first, in s from the start; its gap in ms)."""
    xs, ys = [], []
    for r in result["requests"]:
        if not r["ok"] or r["ttft_s"] is None:
            continue
        t = r["sent_s"] + r["ttft_s"]
        for gap in r["itl_s"]:
            t += gap
            xs.append(t)
            ys.append(gap * 1e3)
    return xs, ys


def run_figures(result: dict[str, Any]) -> dict[str, Any]:
    """A run's figures by file name, each titled with the run and showing its SLO limits."""
    title, limits = run_title(result), slo_limits_ms(result)
    done = [r for r in result["requests"] if r["ok"] and r["ttft_s"] is not None]
    ttft = ([r["sent_s"] for r in done], [r["ttft_s"] * 1e3 for r in done])
    figures = {
        "latency_cdf.png": cdf_figure([(None, result)], title, limits),
        "ttft_over_time.png": scatter_figure(
            *ttft, f"TTFT by send time\n{title}", "TTFT (ms)", limits.get("ttft")
        ),
        "itl_over_time.png": scatter_figure(
            *itl_points(result), f"ITL by token arrival time\n{title}", "ITL (ms)"
        ),
    }
    if result.get("conversations"):
        figures["ttft_by_turn.png"] = scatter_figure(
            *ttft_by_turn(result), f"TTFT by turn\n{title}", "TTFT (ms)", limits.get("ttft"), "turn"
        )
    return figures


def plot_run(result: dict[str, Any], out_dir: str) -> list[str]:
    """Writes latency_cdf.png, ttft_over_time.png, itl_over_time.png, and ttft_by_turn.png
    for a multi-turn run; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [_save(fig, os.path.join(out_dir, name)) for name, fig in run_figures(result).items()]


def ttft_by_turn(result: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(turn index, TTFT in ms) of each completed turn of a multi-turn result."""
    turns, ttfts = [], []
    for conv in result.get("conversations") or []:
        for turn, index in enumerate(conv["request_indices"], 1):
            record = result["requests"][index]
            if record["ok"] and record["ttft_s"] is not None:
                turns.append(turn)
                ttfts.append(record["ttft_s"] * 1e3)
    return turns, ttfts


def plot_compare(runs: Sequence[tuple[str, dict[str, Any]]], path: str) -> str:
    """Latency CDFs of several runs overlaid, one panel per latency kind."""
    return _save(cdf_figure(list(runs)), path)


def _bars(ax: Any, labels: Sequence[str], series: dict[str, Sequence[float | None]]) -> None:
    """Grouped bars: one group per run, one bar per series; missing values are left out."""
    width = 0.8 / len(series)
    for n, (name, values) in enumerate(series.items()):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(labels))]
        kept = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
        texts = [f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" for _, v in kept]
        ax.bar_label(bars, labels=texts, fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_compare_bars(
    runs: Sequence[tuple[str, dict[str, Any]]], oracle_shares: Sequence[float | None], path: str
) -> str:
    """A run's headline figures side by side: TTFT p50/p99, cached-token share (and what an
    oracle router would get), output throughput, KV bytes on the wire."""
    plt = _pyplot()
    labels = [label for label, _ in runs]
    results = [result for _, result in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ttft = {f"p{p}": [r.get(f"p{p}_ttft_ms") for r in results] for p in (50, 99)}
    _bars(axes[0][0], labels, ttft)
    axes[0][0].set_title("TTFT (ms)")
    shares = {"measured": [r.get("cached_token_share") for r in results]}
    if any(o is not None for o in oracle_shares):
        shares["oracle"] = list(oracle_shares)
    _bars(axes[0][1], labels, shares)
    axes[0][1].set_title("cached-token share of prompt tokens")
    _bars(axes[1][0], labels, {"tok/s": [r.get("output_throughput") for r in results]})
    axes[1][0].set_title("output throughput (tokens/s)")
    kv = [r.get("kv_transfer_bytes") for r in results]
    _bars(axes[1][1], labels, {"MiB": [b / 2**20 if b is not None else None for b in kv]})
    axes[1][1].set_title("KV bytes on the wire (MiB)")
    return _save(fig, path)


def plot_sweep(points: Sequence[tuple[float, float, float]], target_share: float, path: str) -> str:
    """Goodput share and request goodput per rate; `points` are (rate, share, goodput)."""
    plt = _pyplot()
    ordered = sorted(points)
    rates = [p[0] for p in ordered]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rates, [p[1] for p in ordered], marker="o")
    ax1.axhline(target_share, linestyle="--", color="gray", label="target")
    ax1.set_title("goodput share by request rate")
    ax1.set_ylabel("share of requests within SLO")
    ax1.legend()
    ax2.plot(rates, [p[2] for p in ordered], marker="o")
    ax2.set_title("request goodput by request rate")
    ax2.set_ylabel("req/s within SLO")
    for ax in (ax1, ax2):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    return _save(fig, path)
