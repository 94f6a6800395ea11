"""`pdserve bench` against a real colocated tiny-random server over loopback: the report
agrees with the server's own Prometheus counters, failures carry their reason, files are
written, and a trace replay keeps the trace's timing. Kept short for 2 cores."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest

from pdserve.bench import driver, runner
from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import summarize
from pdserve.bench.server_stats import parse_prometheus
from pdserve.bench.trace import parse_trace, trace_send_times
from pdserve.bench.workload import Prompt

MODEL = '{model_name="tiny-random"}'  # the label on each of tiny_server's counters

JSON_FIELDS = [
    "completed", "failed", "failed_by_reason", "duration", "total_input_tokens",
    "total_output_tokens", "request_throughput", "input_throughput", "output_throughput",
    "total_token_throughput", "goodput_share", "request_goodput", "server_counters",
    "input_lens", "output_lens", "ttfts", "itls", "errors", "requests", "config",
    *(f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
      for stat in ("mean", "median", "std", "p50", "p90", "p99")),
]  # fmt: skip
RECORD_FIELDS = {
    "index", "prompt_len", "output_len_requested", "scheduled_s", "sent_s", "ok", "ttft_s",
    "itl_s", "e2el_s", "tpot_s", "output_tokens", "output_tokens_from_server", "error_kind",
    "error", "cached_tokens", "output_ids", "output_text", "output_top_logprobs",
}  # fmt: skip


def server_counts(url: str) -> dict[str, float]:
    """(requests, prompt tokens, generated tokens) as the server counted them so far."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        samples, _ = parse_prometheus(resp.read().decode())
    requests = sum(v for k, v in samples.items() if k.startswith("pdserve_requests_total"))
    return {
        "requests": requests,
        "prompt_tokens": samples.get(f"pdserve_prompt_tokens_total{MODEL}", 0.0),
        "output_tokens": samples.get(f"pdserve_generation_tokens_total{MODEL}", 0.0),
    }


@pytest.mark.parametrize("endpoint", ["generate", "completions", "chat"])
def test_report_counts_equal_the_servers_counters(
    tiny_server, tmp_path: Path, endpoint: str, capsys: pytest.CaptureFixture
):
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    cfg = BenchConfig(
        base_url=tiny_server.url, endpoint=endpoint, num_prompts=5, warmup_requests=1,
        random_input_len=40, random_output_len=6, random_range_ratio=0.5, max_concurrency=2,
        output=str(out), plot_dir=str(plots), progress=False, request_timeout_s=60.0,
    )  # fmt: skip
    before = server_counts(tiny_server.url)
    asyncio.run(driver.run_single(cfg))
    after = server_counts(tiny_server.url)
    result = json.loads(out.read_text())
    warmup = result["requests"][0]  # the warmup prompt has the first prompt's lengths
    assert (result["completed"], result["failed"]) == (5, 0)
    assert after["requests"] - before["requests"] == 5 + 1
    assert result["total_input_tokens"] == after["prompt_tokens"] - before["prompt_tokens"] - warmup["prompt_len"]  # fmt: skip
    assert result["total_output_tokens"] == after["output_tokens"] - before["output_tokens"] - warmup["output_len_requested"]  # fmt: skip
    # text prompts were fitted so that the server's own tokenizer count is the requested one
    assert result["input_lens"] == [r["prompt_len"] for r in result["requests"]]
    assert result["output_lens"] == [r["output_len_requested"] for r in result["requests"]]
    assert result["output_tokens_from_server"] is True
    assert result["server_counters"][f"pdserve_generation_tokens_total{MODEL}"] == result["total_output_tokens"]  # fmt: skip
    for name in JSON_FIELDS:
        assert name in result, name
    assert all(set(r) == RECORD_FIELDS for r in result["requests"])
    for png in ("latency_cdf.png", "ttft_over_time.png", "itl_over_time.png"):
        assert (plots / png).stat().st_size > 5000
    printed = capsys.readouterr().out
    assert f"result JSON written to {out}" in printed
    assert f"plots written to {plots}: latency_cdf.png, ttft_over_time.png" in printed


def test_requested_input_lengths_reach_the_server_exactly(tiny_server):
    """Completions text was fitted with the served tokenizer: the server counts those tokens."""
    cfg = BenchConfig(
        base_url=tiny_server.url, endpoint="completions", num_prompts=4, random_input_len=50,
        random_output_len=2, random_range_ratio=0.8, progress=False, seed=7,
        request_timeout_s=60.0,
    )  # fmt: skip
    result = asyncio.run(driver.run_single(cfg))
    prompts, _, _ = runner.build_workload(cfg, runner.load_tokenizer(result["tokenizer"]))
    assert [r["prompt_len"] for r in result["requests"]] == [p.input_len for p in prompts]
    assert len({p.input_len for p in prompts}) > 1


def test_a_prompt_over_the_context_length_fails_with_its_reason(tiny_server):
    target = runner.Target(tiny_server.url, "generate", None, 0.0, True, None, 60.0)
    prompts = [Prompt([5] * 10, 3), Prompt([5] * 5000, 3), Prompt([6] * 12, 3)]

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await runner.send_all(session, target, prompts, [0.0] * 3, None)

    records, duration_s = asyncio.run(go())
    summary = summarize(records, duration_s)
    assert (summary["completed"], summary["failed"]) == (2, 1)
    assert summary["failed_by_reason"] == {"http_400": 1}
    assert "context length" in records[1].error
    assert summary["total_input_tokens"] == 22 and summary["total_output_tokens"] == 6


def test_a_server_stopped_mid_run_fails_the_rest_with_connection_errors(server_factory):
    server = server_factory(["--model-path", "tiny-random"])
    cfg = BenchConfig(
        base_url=server.url, num_prompts=6, random_input_len=16, random_output_len=4,
        max_concurrency=1, progress=False, request_timeout_s=60.0,
    )  # fmt: skip
    killed = []

    def kill_after_first(_record) -> None:
        if not killed:
            killed.append(True)
            server.signal_group(signal.SIGKILL)

    result = asyncio.run(driver.run_single(cfg, on_record=kill_after_first))
    assert result["completed"] >= 1 and result["failed"] >= 4
    assert result["completed"] + result["failed"] == 6
    assert set(result["failed_by_reason"]) == {"connection"}
    assert result["server_counters"] is None  # nothing to scrape after the kill


def test_a_metrics_server_gone_by_the_end_is_a_warning_naming_it(
    tiny_server, server_factory, capsys: pytest.CaptureFixture
):
    side = server_factory(["--model-path", "tiny-random"])
    cfg = BenchConfig(
        base_url=tiny_server.url, metrics_urls=[side.url], num_prompts=3, random_input_len=16,
        random_output_len=2, max_concurrency=1, progress=False,
    )  # fmt: skip
    stopped = []

    def stop_after_first(_record) -> None:
        if not stopped:
            stopped.append(side.stop())

    result = asyncio.run(driver.run_single(cfg, on_record=stop_after_first))
    assert result["completed"] == 3  # the run's own figures stand
    err = capsys.readouterr().err
    assert f"warning: --metrics-urls {side.url}: GET /metrics failed" in err


def test_output_and_plot_folders_that_do_not_exist_are_created(tiny_server, tmp_path: Path):
    output, plot_dir = tmp_path / "new" / "run.json", tmp_path / "plots" / "run"
    cfg = BenchConfig(
        base_url=tiny_server.url, num_prompts=2, random_input_len=8, random_output_len=2,
        output=str(output), plot_dir=str(plot_dir), progress=False,
    )  # fmt: skip
    assert driver.main(cfg) == 0
    assert json.loads(output.read_text())["completed"] == 2
    assert (plot_dir / "latency_cdf.png").exists()


def test_trace_replay_keeps_the_traces_relative_timing(tiny_server, tmp_path: Path):
    rows = [(0, 30, 2, [1, 2]), (300, 20, 2, [1]), (340, 40, 3, [3]), (900, 25, 2, [1, 4]),
            (1300, 30, 2, [])]  # fmt: skip
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": t, "input_length": n_in, "output_length": n_out, "hash_ids": h})
        + "\n" for t, n_in, n_out, h in rows
    ))  # fmt: skip
    cfg = BenchConfig(
        base_url=tiny_server.url, dataset_name="trace", trace_file=str(trace),
        trace_speedup=2.0, trace_block_size=16, progress=False, request_timeout_s=60.0,
    )  # fmt: skip
    result = asyncio.run(driver.run_single(cfg))
    expected = trace_send_times(parse_trace(trace.read_text().splitlines()), 2.0)
    sent = [r["sent_s"] for r in result["requests"]]
    assert result["completed"] == 5
    assert [r["prompt_len"] for r in result["requests"]] == [30, 20, 40, 25, 30]
    assert [r["scheduled_s"] for r in result["requests"]] == pytest.approx(expected)
    assert sent == pytest.approx(expected, abs=0.05)


def test_a_sweep_runs_each_rate_and_names_the_best(
    tiny_server, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "sweep.json"
    cfg = BenchConfig(
        base_url=tiny_server.url, num_prompts=3, random_input_len=16, random_output_len=3,
        sweep_rates=[20.0, 10.0], slo_ttft_ms=60000.0, output=str(out),
        plot_dir=str(tmp_path / "plots"), progress=False, request_timeout_s=60.0,
    )  # fmt: skip
    asyncio.run(driver.run_sweep(cfg))
    sweep = json.loads(out.read_text())
    assert [run["request_rate"] for run in sweep["runs"]] == [10, 20]
    assert sweep["best_rate"] == 20 and sweep["first_bad_rate"] is None
    assert json.loads((tmp_path / "sweep.rate-20.json").read_text())["completed"] == 3
    assert (tmp_path / "plots" / "sweep.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "rate-10" / "latency_cdf.png").exists()
    printed = capsys.readouterr().out
    assert f"sweep summary JSON written to {out}" in printed
    assert f"result JSON written to {tmp_path / 'sweep.rate-20.json'}" in printed
    assert f"sweep plot written to {tmp_path / 'plots' / 'sweep.png'}" in printed
