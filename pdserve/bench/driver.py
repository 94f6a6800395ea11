"""What `pdserve bench` does end to end: discover the server, build the workload, warm up,
measure once or sweep rates, then print the table and write the JSON and plots.
Runs in the benchmark client process (asyncio).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdserve.auth import bearer_header
from pdserve.bench import client, conversations, report, runner
from pdserve.bench.config import BenchConfig, parse_extra_body
from pdserve.bench.metrics import RequestRecord, summarize
from pdserve.bench.server_stats import counter_deltas, stage_summary
from pdserve.bench.sweep import RateSweep
from pdserve.bench.workload import Prompt


@dataclass
class Prepared:
    """Everything a run needs that does not depend on the request rate."""

    target: runner.Target
    prompts: list[Prompt]
    trace_times: list[float] | None
    info: dict[str, Any]


def client_session(cfg: BenchConfig) -> aiohttp.ClientSession:
    """No connection cap; every request carries --api-key as a Bearer token when set."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), headers=bearer_header(cfg.api_key)
    )


async def connect(
    session: aiohttp.ClientSession, cfg: BenchConfig
) -> tuple[runner.Target, Any, dict[str, Any]]:
    """Find the tokenizer and model name: (target, tokenizer, what was measured)."""
    base_url = cfg.base_url.rstrip("/")
    model_info = await client.get_json(session, base_url + "/model_info")
    if model_info is None and cfg.tokenizer is None:
        raise RuntimeError(
            f"{base_url}/model_info did not answer: is the server up? (or pass --tokenizer)"
        )
    # vLLM and SGLang have no /model_info: with --tokenizer, any HTTP answer will do
    why = None if model_info is not None else await client.unreachable(session, base_url)
    if why is not None:
        raise RuntimeError(f"--base-url {base_url} does not answer ({why})")
    await conversations.check_metrics_urls(session, [u.rstrip("/") for u in cfg.metrics_urls])
    tokenizer_path = runner.resolve_tokenizer_path(cfg.tokenizer, model_info)
    tokenizer = runner.load_tokenizer(tokenizer_path)
    model = cfg.model
    if model is None and cfg.endpoint != "generate":
        model = await client.served_model_name(session, base_url)  # None: no `model` sent
    target = runner.Target(
        base_url, cfg.endpoint, model, cfg.temperature, cfg.ignore_eos,
        parse_extra_body(cfg.extra_body), cfg.request_timeout_s,
    )  # fmt: skip
    info = {
        "model": model or (model_info or {}).get("model_path"),
        "tokenizer": tokenizer_path,
        "server_model_info": model_info,
    }
    return target, tokenizer, info


async def prepare(session: aiohttp.ClientSession, cfg: BenchConfig) -> Prepared:
    """Connect, build the workload, and send the warmup."""
    target, tokenizer, info = await connect(session, cfg)
    prompts, trace_times, warmup = runner.build_workload(cfg, tokenizer)
    await _warm_up(session, target, warmup, cfg.max_concurrency)
    info.update(num_prompts=len(prompts), warmup_requests=len(warmup))
    return Prepared(target, prompts, trace_times, info)


async def run_multiturn(
    cfg: BenchConfig, on_record: Callable[[RequestRecord], None] | None = None
) -> dict[str, Any]:
    """`pdserve bench --dataset-name multiturn`: conversations instead of independent prompts."""
    async with client_session(cfg) as session:
        target, tokenizer, info = await connect(session, cfg)
        plans = conversations.build_plans(cfg, tokenizer)
        warmup = conversations.warmup_prompts(cfg, tokenizer)
        await _warm_up(session, target, warmup, cfg.max_concurrency)
        info.update(num_prompts=cfg.num_conversations * cfg.num_turns, warmup_requests=len(warmup))
        bar, tick = _progress(cfg, cfg.num_conversations * cfg.num_turns)

        def on_done(record: RequestRecord) -> None:
            tick(record)
            if on_record is not None:
                on_record(record)

        try:
            result = await conversations.measure_conversations(
                session, cfg, target, plans, info, on_done
            )
        finally:
            bar.close()
    print(report.format_table(result))
    print(report.format_turn_table(result))
    _save(result, cfg.output, cfg.plot_dir)
    return result


async def _warm_up(
    session: aiohttp.ClientSession,
    target: runner.Target,
    warmup: list[Prompt],
    max_concurrency: int | None,
) -> None:
    """Send the warmup prompts at once and wait for them; any failure stops the benchmark
    (a setup that fails its warmup would only measure its errors)."""
    if not warmup:
        return
    times = [0.0] * len(warmup)
    records, _ = await runner.send_all(session, target, warmup, times, max_concurrency)
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"warmup request failed: {failed[0].error_kind}: {failed[0].error}")


def _progress(cfg: BenchConfig, total: int) -> tuple[Any, Callable[[RequestRecord], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, disable=not cfg.progress, desc="requests", file=sys.stderr)
    return bar, lambda _record: bar.update(1)


async def measure(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    prep: Prepared,
    rate: float,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> dict[str, Any]:
    """One measured run at `rate` (a trace keeps its own times); returns the full result."""
    times = prep.trace_times or runner.send_times(cfg, len(prep.prompts), rate)
    metrics_url = prep.target.base_url + "/metrics"
    before = await client.get_text(session, metrics_url)
    servers = [u.rstrip("/") for u in cfg.metrics_urls]
    servers_before = await conversations.scrape_all(session, servers)
    bar, tick = _progress(cfg, len(prep.prompts))

    def on_done(record: RequestRecord) -> None:
        tick(record)
        if on_record is not None:
            on_record(record)

    try:
        records, duration_s = await runner.send_all(
            session, prep.target, prep.prompts, times, cfg.max_concurrency, on_done
        )
    finally:
        bar.close()
    after = await client.get_text(session, metrics_url)
    servers_after = await conversations.scrape_all(session, servers)
    counters = counter_deltas(before, after) if before and after else None
    summary = summarize(records, duration_s, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    result = report.build_result(cfg, rate, summary, records, prep.info, counters)
    scrapes = dict(zip(servers, zip(servers_before, servers_after, strict=True), strict=True))
    result["disagg_stages"] = stage_summary(scrapes) if servers else None
    return result


def _save(result: dict[str, Any], output: str | None, plot_dir: str | None) -> None:
    """Write the result JSON and the run's plots where asked, and say where."""
    if output:
        report.write_json(output, result)
        print(f"result JSON written to {os.path.abspath(output)}", flush=True)
    if plot_dir:
        from pdserve.bench.plots import plot_run

        paths = plot_run(result, plot_dir)
        names = ", ".join(os.path.basename(p) for p in paths)
        print(f"plots written to {os.path.abspath(plot_dir)}: {names}", flush=True)


async def run_single(
    cfg: BenchConfig, on_record: Callable[[RequestRecord], None] | None = None
) -> dict[str, Any]:
    """`pdserve bench` without a sweep: one run at --request-rate, reported and saved."""
    async with client_session(cfg) as session:
        prep = await prepare(session, cfg)
        result = await measure(session, cfg, prep, cfg.request_rate, on_record)
    print(report.format_table(result))
    _save(result, cfg.output, cfg.plot_dir)
    return result


def _rate_path(path: str | None, rate: float) -> str | None:
    if path is None:
        return None
    stem, ext = os.path.splitext(path)
    return f"{stem}.rate-{rate:g}{ext}"


async def run_sweep(cfg: BenchConfig) -> dict[str, Any]:
    """One run per rate (see `RateSweep`); each run is saved beside --output and --plot-dir,
    and the sweep's summary (every run less its per-request records) goes to --output."""
    sweep = RateSweep(cfg.sweep_rates, cfg.sweep_target, cfg.sweep_search_steps)
    runs = []
    async with client_session(cfg) as session:
        prep = await prepare(session, cfg)
        while (rate := sweep.next_rate()) is not None:
            result = await measure(session, cfg, prep, rate)
            sweep.record(rate, result["goodput_share"])
            share, goodput = result["goodput_share"], result["request_goodput"]
            print(f"rate {rate:g} req/s: goodput share {share:.3f}, {goodput:.2f} req/s good")
            plot_dir = cfg.plot_dir and os.path.join(cfg.plot_dir, f"rate-{rate:g}")
            _save(result, _rate_path(cfg.output, rate), plot_dir)
            runs.append(report.without_records(result))
    summary = {
        "sweep_target": cfg.sweep_target,
        "best_rate": sweep.best_rate,
        "first_bad_rate": sweep.first_bad_rate,
        "runs": runs,
    }
    print(f"highest rate with goodput share >= {cfg.sweep_target}: {sweep.best_rate} req/s")
    if cfg.output:
        report.write_json(cfg.output, summary)
        print(f"sweep summary JSON written to {os.path.abspath(cfg.output)}", flush=True)
    if cfg.plot_dir:
        from pdserve.bench.plots import plot_sweep

        points = [(r["request_rate"], r["goodput_share"], r["request_goodput"]) for r in runs]
        path = plot_sweep(points, cfg.sweep_target, os.path.join(cfg.plot_dir, "sweep.png"))
        print(f"sweep plot written to {os.path.abspath(path)}", flush=True)
    return summary


def check_outputs(output: str | None, plot_dir: str | None) -> None:
    """Before anything is launched or sent: create --output's folder and --plot-dir (as the
    plots would at the end) and prove both writable, so a bad path costs no run."""
    folders = []
    if output:
        if os.path.isdir(output):
            raise OSError(f"--output {output}: is a directory (give the JSON file's path)")
        if os.path.exists(output) and not os.access(output, os.W_OK):
            raise OSError(f"--output {output}: the file is not writable")
        folders.append(("--output", output, os.path.dirname(output) or "."))
    if plot_dir:
        folders.append(("--plot-dir", plot_dir, plot_dir))
    for flag, path, folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise OSError(f"{flag} {path}: cannot write there ({exc})") from None


def main(cfg: BenchConfig) -> int:
    """Run the benchmark; exit status 1 when every request failed."""
    from pdserve.bench.launch import launched

    check_outputs(cfg.output, cfg.plot_dir)
    with launched(cfg.launch, cfg.base_url, cfg.launch_timeout_s, cfg.api_key):
        if cfg.sweep_rates:
            asyncio.run(run_sweep(cfg))
            return 0
        if cfg.dataset_name == "multiturn":
            result = asyncio.run(run_multiturn(cfg))
        else:
            result = asyncio.run(run_single(cfg))
    return 1 if result["completed"] == 0 else 0
