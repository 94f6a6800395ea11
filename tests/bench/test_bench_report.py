"""The result JSON, the terminal table, the comparison and the plots, from hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.compare import compare_rows, format_compare, load_run
from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import LATENCIES
from pdserve.bench.plots import cdf_points, itl_points, plot_run, run_figures, run_title
from pdserve.bench.report import build_result, format_table, write_json
from pdserve.bench.server_stats import stage_summary
from tests.bench.sample_runs import make_result

VLLM_FIELDS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "input_throughput", "output_throughput", "request_goodput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "mean_tpot_ms",
    "mean_e2el_ms", "input_lens", "output_lens", "ttfts", "itls", "errors",
]  # fmt: skip


def test_result_holds_vllm_fields_and_every_latency_figure():
    result = make_result("a", 1.0)
    for name in VLLM_FIELDS:
        assert name in result, name
    for name in LATENCIES:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{name}_ms" in result
    assert result["failed_by_reason"] == {"http_400": 1}
    assert result["server_counters"] == {"x_total": 6.0}
    assert result["requests"][5]["error_kind"] == "http_400"
    assert result["requests"][0]["tpot_s"] == pytest.approx(0.01)
    json.loads(json.dumps(result, allow_nan=False))  # strict JSON: inf rate written as "inf"
    assert result["request_rate"] == "inf"


def test_the_result_json_never_holds_the_api_key(tmp_path: Path):
    """`pdserve bench --api-key K --output run.json` wrote K into run.json's config."""
    cfg = BenchConfig(api_key="sk-bench-secret-1", label="keyed")
    result = build_result(cfg, 1.0, {}, [], {}, None)
    assert result["config"]["api_key"] == "<set>" and result["config"]["label"] == "keyed"
    write_json(str(tmp_path / "run.json"), result)
    assert "sk-bench-secret-1" not in (tmp_path / "run.json").read_text()
    assert build_result(BenchConfig(), 1.0, {}, [], {}, None)["config"]["api_key"] is None


def test_table_shows_counts_failures_and_goodput():
    table = format_table(make_result("a", 1.0))
    assert "Successful requests:" in table and "http_400:" in table
    assert "Goodput share" in table and "P99 ITL (ms):" in table


def test_compare_puts_runs_side_by_side_with_ratios(tmp_path: Path):
    write_json(str(tmp_path / "a.json"), make_result("colocated", 1.0))
    write_json(str(tmp_path / "b.json"), make_result(None, 2.0))
    runs = [load_run(str(tmp_path / "a.json")), load_run(str(tmp_path / "b.json"))]
    assert [label for label, _ in runs] == ["colocated", "b"]
    rows = {row[0]: row[1:] for row in compare_rows(runs)}
    assert rows["metric"] == ["colocated", "b", "b/colocated"]
    assert rows["mean_ttft_ms"] == ["20.00", "40.00", "2.00x"]
    assert "mean_itl_ms" in format_compare(runs)


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path: Path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a pdserve bench result"):
        load_run(str(tmp_path / "x.json"))


def test_itl_points_place_each_gap_at_its_arrival_time():
    xs, ys = itl_points(make_result("a", 1.0))
    assert xs[:3] == pytest.approx([0.03, 0.04, 0.05])
    assert ys[:3] == pytest.approx([10.0, 10.0, 10.0])


def test_plots_are_written_and_not_empty(tmp_path: Path):
    paths = plot_run(make_result("a", 1.0), str(tmp_path / "plots"))
    assert [Path(p).name for p in paths] == [
        "latency_cdf.png", "ttft_over_time.png", "itl_over_time.png",
    ]  # fmt: skip
    for path in paths:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(path).stat().st_size > 5000


def test_a_cdf_starts_at_zero_and_climbs_one_step_per_sample():
    assert cdf_points([30.0, 10.0, 20.0, 20.0]) == (
        [10.0, 10.0, 20.0, 20.0, 30.0],
        [0.0, 0.25, 0.5, 0.75, 1.0],
    )
    assert cdf_points([]) == ([], [])


def test_a_runs_title_names_its_label_load_and_slo_limits():
    assert run_title(make_result("colocated", 1.0)) == (
        "colocated: generate @ inf req/s; 5 requests; SLO TTFT <= 30 ms"
    )
    assert run_title(make_result(None, 1.0)).startswith("unlabelled run: generate")


def _dashed_x(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_single_run_plots_show_the_label_the_slo_limit_and_cdfs_from_zero():
    import matplotlib.pyplot as plt

    figures = run_figures(make_result("pd-1p1d", 1.0))
    try:
        cdf = figures["latency_cdf.png"]
        assert cdf._suptitle.get_text().startswith("pd-1p1d: ")
        ttft_ax, tpot_ax, itl_ax, _ = cdf.axes
        assert _dashed_x(ttft_ax) == [30.0]  # the run's TTFT SLO; it set no TPOT SLO
        assert _dashed_x(tpot_ax) == [] and _dashed_x(itl_ax) == []
        curve = next(line for line in ttft_ax.get_lines() if line.get_linestyle() != "--")
        assert curve.get_ydata()[0] == 0.0 and curve.get_ydata()[-1] == 1.0
        scatter = figures["ttft_over_time.png"].axes[0]
        assert "pd-1p1d" in scatter.get_title()
        dashed_y = [ln.get_ydata()[0] for ln in scatter.get_lines() if ln.get_linestyle() == "--"]
        assert dashed_y == [30.0]
        assert "pd-1p1d" in figures["itl_over_time.png"].axes[0].get_title()
    finally:
        for fig in figures.values():
            plt.close(fig)


def stage_metrics(sums: dict[str, float], counts: dict[str, int]) -> str:
    lines = ["# TYPE pdserve_disagg_stage_seconds histogram"]
    for stage, value in sums.items():
        lines.append(f'pdserve_disagg_stage_seconds_sum{{model_name="m",stage="{stage}"}} {value}')
        lines.append(
            f'pdserve_disagg_stage_seconds_count{{model_name="m",stage="{stage}"}} {counts[stage]}'
        )
        lines.append(
            f'pdserve_disagg_stage_seconds_bucket{{le="1.0",model_name="m",stage="{stage}"}} 99'
        )
    return "\n".join(lines) + "\n"


def test_stage_means_are_what_the_run_added_summed_over_servers():
    prefill = (
        stage_metrics({"prefill_compute": 10.0}, {"prefill_compute": 5}),
        stage_metrics({"prefill_compute": 13.0}, {"prefill_compute": 9}),
    )
    decode = (
        stage_metrics({"decode_total": 1.0, "decode_bootstrap": 0.5}, {"decode_total": 1, "decode_bootstrap": 1}),
        stage_metrics({"decode_total": 2.0, "decode_bootstrap": 0.5}, {"decode_total": 3, "decode_bootstrap": 1}),
    )  # fmt: skip
    stages = stage_summary({"http://p": prefill, "http://d": decode, "http://gone": (None, None)})
    # 3 s over 4 requests; 1 s over 2; decode_bootstrap saw no request during the run.
    assert stages == {
        "prefill_compute": {"count": 4, "mean_ms": 750.0},
        "decode_total": {"count": 2, "mean_ms": 500.0},
    }
    table = format_table({**make_result("pd", 1.0), "disagg_stages": stages})
    assert "prefill_compute:" in table and "750.0 [4]" in table


def test_every_field_of_the_result_is_in_the_docs_table():
    """docs/bench.md's JSON field table left out version, backend, num_prompts, ..."""
    import re

    from tests.helpers import REPO_ROOT

    docs = (REPO_ROOT / "docs" / "bench.md").read_text()
    documented = set(re.findall(r"`([a-z0-9_{},]+)`", docs))
    stats = {
        f"{s}_{n}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99") for n in LATENCIES
    }
    result = make_result("a", 1.0)
    result.update(num_prompts=6, warmup_requests=0)  # as the driver adds them
    missing = set(result) - documented - stats
    assert not missing, missing
