"""The KV transfer benchmark runs end to end (tiny sizes; it makes no speed claim here)."""

from __future__ import annotations

from pdserve.bench import kv_transfer_bench


def test_bench_reports_every_method_for_every_size(capsys) -> None:
    kv_transfer_bench.main(["--sizes-mib", "1", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "raw TCP" in out and "KV scattered" in out
    rows = [line for line in out.splitlines() if "MiB |" in line]
    assert [row.split()[0] for row in rows] == ["1", "2"]
