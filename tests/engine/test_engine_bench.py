"""`pdserve bench-engine` runs end to end on tiny-random and reports every figure."""

from __future__ import annotations

import json

from pdserve.bench.engine_bench import EngineBenchConfig, format_table, run
from pdserve.cli import build_parser


def test_bench_engine_reports_throughput_speedup_and_floor():
    cfg = EngineBenchConfig(
        models=["tiny-random"],
        batch_sizes=[1, 4],
        prompt_len=8,
        new_tokens=4,
        sequential_requests=4,
        floor_rounds=2,
    )
    report = run(cfg)
    (model,) = report["models"]
    assert set(model["by_batch"]) == {1, 4}
    for row in model["by_batch"].values():
        for side in ("pdserve", "transformers"):
            assert row[side]["prefill_tok_s"] > 0 and row[side]["decode_tok_s"] > 0
    assert model["concurrent"]["speedup"] > 0 and model["floor"]["floor_ms"] > 0
    floor = model["floor"]
    assert floor["copy_bandwidth_gbs"] > 0 and floor["read_bandwidth_gbs"] > 0
    assert floor["ratio"] > 0 and floor["read_ratio"] > 0
    table = format_table(report)
    assert "tiny-random" in table and "weight-read floor" in table
    assert "fit in the caches" in table  # tiny-random: 1 MB, no memory floor to meet
    json.dumps(report)


def test_bench_engine_is_a_cli_subcommand():
    args = build_parser().parse_args(
        ["bench-engine", "--models", "tiny-random", "--output", "json"]
    )
    assert args.models == ["tiny-random"] and args.output == "json" and callable(args.func)
