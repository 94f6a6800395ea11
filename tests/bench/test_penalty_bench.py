"""The penalty bench runs both paths on the same growing requests, checks every step that
they give the same logits, and reports a ratio per output length."""

from __future__ import annotations

from pdserve.bench import penalty_bench


def test_penalty_bench_checks_both_paths_agree_and_reports_a_ratio_per_length(capsys) -> None:
    argv = ["--rows", "3", "--prompt-len", "7", "--output-len", "20", "70", "--vocab", "50"]
    assert penalty_bench.main([*argv, "--steps", "5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[-3]) for r in rows] == [
        (n, path) for n in ("20", "70") for path in ("rebuild", "device", "ratio")
    ]
