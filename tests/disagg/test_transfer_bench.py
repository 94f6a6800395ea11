"""The KV transfer and control benchmarks run end to end (tiny runs; no speed claim here)."""

from __future__ import annotations

from pdserve.bench import kv_transfer_bench
from pdserve.disagg.transfer.nixl_agent import nixl_missing


def test_bench_reports_every_method_for_every_size(capsys) -> None:
    kv_transfer_bench.main(["--sizes-mib", "1", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "raw TCP" in out and "KV scattered" in out
    if nixl_missing() is None:  # the NIXL columns come in the same run
        assert "NIXL UCX shm" in out and "NIXL UCX tcp" in out
    rows = [line for line in out.splitlines() if "MiB |" in line]
    assert [row.split()[0] for row in rows] == ["1", "2"]


def test_control_bench_times_every_channel_against_zmq(capsys) -> None:
    from pdserve.bench import control_bench

    control_bench.main(["--rounds", "3", "--warmup", "1"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["zmq", "lane", "lane-spin"]
    assert rows[0].split()[-1] == "1.00"  # the baseline against itself
