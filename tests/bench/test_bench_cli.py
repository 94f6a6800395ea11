"""The `pdserve bench` command line: compare, and clean errors instead of tracebacks."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.bench.config import BenchConfig
from pdserve.bench.report import write_json
from pdserve.bench.server_stats import parse_prometheus
from tests.bench.sample_runs import make_result
from tests.helpers import REPO_ROOT, free_port, http_json


def pdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def compare(tmp_path: Path, labels: tuple[str, str], *flags: str):
    """`pdserve bench compare` of two results (the second twice the first's figures)."""
    paths = [str(tmp_path / f"{label}.json") for label in labels]
    for path, label, scale in zip(paths, labels, (1.0, 2.0), strict=True):
        write_json(path, make_result(label, scale))
    return pdserve("bench", "compare", *paths, *flags)


def test_compare_command_prints_the_table_and_writes_the_plot(tmp_path: Path):
    plot = tmp_path / "cmp.png"
    proc = compare(tmp_path, ("colocated", "pd"), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "pd/colocated" in out and "p99_e2el_ms" in out
    assert plot.stat().st_size > 5000


def test_compare_writes_bars_of_the_headline_figures(tmp_path: Path):
    plot = tmp_path / "bars.png"
    proc = compare(tmp_path, ("round_robin", "kv_aware"), "--plot-bars", str(plot))
    assert proc.returncode == 0, proc.stderr
    assert f"plot written to {plot}" in proc.stdout and plot.stat().st_size > 5000


def test_an_unreachable_server_is_a_clear_error_not_a_traceback():
    proc = pdserve("bench", "--base-url", f"http://127.0.0.1:{free_port()}", "--no-progress")
    assert proc.returncode == 2
    assert "model_info did not answer" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_server_is_an_error_also_with_a_tokenizer(tokenizer_dir: str):
    """With --tokenizer (as against vLLM, which has no /model_info) a dead --base-url ran
    the whole workload into connection errors and printed a report, exit status 1."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = pdserve("bench", "--base-url", url, "--tokenizer", tokenizer_dir, "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--base-url {url} does not answer (ClientConnectorError" in proc.stderr
    assert "Successful requests" not in proc.stdout


def test_a_tokenizer_that_cannot_be_loaded_is_named(tmp_path: Path):
    """--tokenizer ./typo said only "Repo id must use alphanumeric chars ...: './typo'"."""
    from pdserve.bench.runner import load_tokenizer

    with pytest.raises(ValueError, match=r"tokenizer './typo' cannot be loaded .*--tokenizer"):
        load_tokenizer("./typo")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_tokenizer(str(tmp_path))  # a folder without one


def test_a_base_url_without_a_scheme_is_refused():
    with pytest.raises(ValueError, match="--base-url must look like http://host:port"):
        BenchConfig(base_url="127.0.0.1:30000")


def test_a_bad_option_value_names_the_flag():
    proc = pdserve("bench", "--max-concurrency", "0")
    assert proc.returncode == 2 and "--max-concurrency must be > 0" in proc.stderr


def test_a_base_url_that_is_no_http_url_is_refused_naming_the_flag():
    """It failed as "notaurl/model_info did not answer: is the server up?"."""
    proc = pdserve("bench", "--base-url", "127.0.0.1:30000")
    assert proc.returncode == 2, proc.stderr
    assert "--base-url must look like http://host:port, got '127.0.0.1:30000'" in proc.stderr


def test_compare_needs_two_files(tmp_path: Path):
    write_json(str(tmp_path / "a.json"), make_result("a", 1.0))
    proc = pdserve("bench", "compare", str(tmp_path / "a.json"))
    assert proc.returncode != 0 and "at least two" in proc.stderr


def test_multiturn_on_a_text_endpoint_is_refused_with_the_reason():
    proc = pdserve("bench", "--dataset-name", "multiturn", "--endpoint", "chat")
    assert proc.returncode == 2 and "multiturn sends token ids" in proc.stderr


def test_compare_of_a_missing_or_broken_file_is_a_clear_error(tmp_path: Path):
    write_json(str(tmp_path / "a.json"), make_result("a", 1.0))
    (tmp_path / "garbage.json").write_text("garbage")
    write_json(str(tmp_path / "sweep.json"), {"sweep_target": 0.9, "best_rate": 1, "runs": []})
    for other, reason in [
        ("missing.json", "No such file"),
        ("garbage.json", "garbage.json is not JSON"),
        ("sweep.json", "sweep.json is a --sweep-rates summary"),
    ]:
        proc = pdserve("bench", "compare", str(tmp_path / "a.json"), str(tmp_path / other))
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_an_extra_body_that_turns_off_streaming_is_refused_before_anything_runs():
    port = free_port()  # nothing listens: the refusal comes before any connection
    proc = pdserve(
        "bench", "--base-url", f"http://127.0.0.1:{port}", "--extra-body", '{"stream": false}'
    )
    assert proc.returncode == 2 and "cannot turn off 'stream'" in proc.stderr


def test_an_unreachable_metrics_url_fails_at_start_naming_it(tiny_server):
    def requests_counted() -> float:
        text = http_json("GET", f"{tiny_server.url}/metrics")[1]
        samples, _ = parse_prometheus(text)
        return sum(v for k, v in samples.items() if k.startswith("pdserve_requests_total"))

    before = requests_counted()
    dead = f"http://127.0.0.1:{free_port()}"
    proc = pdserve(
        "bench", "--base-url", tiny_server.url, "--metrics-urls", tiny_server.url, dead,
        "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--metrics-urls {dead}: GET /metrics failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert requests_counted() == before  # refused before any load was sent


@pytest.mark.parametrize("flag", ["--output", "--plot-dir"])
def test_an_unwritable_output_path_fails_before_launch(tmp_path: Path, flag: str):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = str(blocker / "out.json") if flag == "--output" else str(blocker)
    marker = tmp_path / "launched"
    proc = pdserve(
        "bench", "--base-url", f"http://127.0.0.1:{free_port()}", flag, path,
        "--launch", f"sh -c 'touch {marker}; sleep 30'", "--launch-timeout-s", "5",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"pdserve bench: error: {flag} {path}: cannot write there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # refused before --launch started anything


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("burstiness", math.inf, "--burstiness must be finite"),
        ("temperature", math.nan, "--temperature must be finite"),
        ("temperature", -1.0, "--temperature must be >= 0"),
        ("slo_ttft_ms", math.nan, "--slo-ttft-ms must be finite"),
        ("slo_tpot_ms", -5.0, "--slo-tpot-ms must be > 0"),
        ("think_time_s", math.inf, "--think-time-s must be finite"),
        ("trace_length_scale", math.inf, "--trace-length-scale must be finite"),
    ],
)
def test_a_value_that_would_make_the_result_invalid_json_is_refused(flag, value, reason):
    """--burstiness inf wrote `"burstiness": Infinity` and NaN send times, --slo-ttft-ms nan
    and --temperature nan wrote NaN: none of them JSON. They are refused at start."""
    with pytest.raises(ValueError, match=reason):
        BenchConfig(**{flag: value})


def test_compare_plots_a_result_that_has_no_per_request_records(tmp_path: Path):
    """A `vllm bench serve` result (vLLM's field names: no `requests`) stopped `compare
    --plot` with KeyError: 'requests'; its TTFT and ITL arrays are drawn."""
    ours = make_result("pdserve", 1.0)
    theirs = {k: ours[k] for k in ("completed", "mean_ttft_ms", "ttfts", "itls", "errors")}
    write_json(str(tmp_path / "ours.json"), ours)
    write_json(str(tmp_path / "vllm.json"), theirs)
    plot = tmp_path / "cmp.png"
    paths = [str(tmp_path / "ours.json"), str(tmp_path / "vllm.json")]
    proc = pdserve("bench", "compare", *paths, "--plot", str(plot))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "vllm/pdserve" in proc.stdout and plot.stat().st_size > 5000
