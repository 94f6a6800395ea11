"""PNG plots of benchmark results (matplotlib, Agg backend), in the `pdserve bench` client:
latency CDFs, TTFT and ITL over the run, a sweep's goodput per rate, two runs compared.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def samples_ms(result: dict[str, Any]) -> dict[str, list[float]]:
    """Milliseconds per latency kind over a result's completed requests."""
    done = [r for r in result["requests"] if r["ok"]]
    return {
        "ttft": [r["ttft_s"] * 1e3 for r in done if r["ttft_s"] is not None],
        "tpot": [r["tpot_s"] * 1e3 for r in done if r["tpot_s"] is not None],
        "itl": [gap * 1e3 for r in done for gap in r["itl_s"]],
        "e2el": [r["e2el_s"] * 1e3 for r in done if r["e2el_s"] is not None],
    }


def _cdf(ax: Any, values: Sequence[float], label: str | None) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)


def _cdf_grid(path: str, runs: Sequence[tuple[str | None, dict[str, Any]]]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title) in zip(axes.flat, _NAMES.items(), strict=True):
        for label, result in runs:
            _cdf(ax, samples_ms(result)[name], label)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("share of samples")
        ax.grid(alpha=0.3)
        if any(label for label, _ in runs):
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _scatter(path: str, xs: list[float], ys: list[float], title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.scatter(xs, ys, s=6)
    ax.set_title(title)
    ax.set_xlabel("time since start of run (s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def plot_run(result: dict[str, Any], out_dir: str) -> list[str]:
    """Writes latency_cdf.png, ttft_over_time.png, itl_over_time.png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("latency_cdf.png", "ttft_over_time.png", "itl_over_time.png")]  # fmt: skip
    _cdf_grid(paths[0], [(None, result)])
    done = [r for r in result["requests"] if r["ok"] and r["ttft_s"] is not None]
    ttft_x = [r["sent_s"] for r in done]
    _scatter(paths[1], ttft_x, [r["ttft_s"] * 1e3 for r in done], "TTFT by send time", "TTFT (ms)")
    _scatter(paths[2], *itl_points(result), "ITL by token arrival time", "ITL (ms)")
    return paths


def plot_compare(runs: Sequence[tuple[str, dict[str, Any]]], path: str) -> str:
    """Latency CDFs of several runs overlaid, one panel per latency kind."""
    _cdf_grid(path, list(runs))
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
