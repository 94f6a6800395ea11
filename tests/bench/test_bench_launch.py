"""`pdserve bench --launch CMD`: the command is started, waited for, and always stopped."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.bench.launch import launched
from tests.helpers import REPO_ROOT, free_port, http_status, python_path_env, wait_until


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_command_that_exits_early_is_reported_with_its_output():
    cmd = f"{shlex.quote(sys.executable)} -c \"print('no model here'); raise SystemExit(3)\""
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*no model here"):
        with launched(cmd, f"http://127.0.0.1:{free_port()}", timeout_s=30):
            pass


def test_a_port_already_in_use_is_refused_before_launching(tmp_path: Path):
    """Something else listening there would answer the readiness checks and the benchmark
    while the launched setup fails to bind: refuse at once, launching nothing."""
    marker = tmp_path / "launched"
    script = f"open({str(marker)!r}, 'w')"
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} .* already in use"):
            with launched(cmd, f"http://127.0.0.1:{port}", timeout_s=30):
                pass
    assert not marker.exists()


def test_a_command_never_ready_is_stopped_at_the_deadline(tmp_path: Path):
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    with pytest.raises(RuntimeError, match="not ready within 1 s"):
        with launched(cmd, f"http://127.0.0.1:{free_port()}", timeout_s=1):
            pass
    assert pid_gone(int(pid_file.read_text()))


def run_bench(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `pdserve bench`; past the deadline SIGTERM it, which must stop what it launched."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "bench", *args], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_path_env(),
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"bench still running after {timeout_s} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bench_launches_a_pd_cluster_measures_it_and_stops_it(tmp_path: Path):
    """`pdserve up` (router + prefill + decode) under `--launch`: the report's request count
    equals the router's counter, and nothing answers once the run is over."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run.json"
    proc = run_bench(
        ["--base-url", url, "--launch",
         f"pdserve up --host 127.0.0.1 --port {port} --model-path tiny-random",
         "--launch-timeout-s", "180", "--request-timeout-s", "30", "--num-prompts", "3",
         "--random-input-len", "20", "--random-output-len", "3", "--no-progress",
         "--label", "1p1d", "--output", str(out)],
        timeout_s=250,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["label"] == "1p1d"
    assert result["total_output_tokens"] == 9 and result["output_tokens_from_server"]
    assert result["server_counters"]['pdserve_router_requests_total{route="/generate"}'] == 3
    assert http_status(url + "/health") is None  # stopped with the run


def test_a_terminated_bench_stops_what_it_launched(tmp_path: Path):
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    bench = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "bench", "--base-url", f"http://127.0.0.1:{free_port()}",
         "--launch", f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 60, "launched pid")
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 143
    finally:
        bench.kill()
    assert pid_gone(int(pid_file.read_text()))
