"""`pdserve bench --launch CMD`: the command is started, waited for, and always stopped."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.bench.launch import launched
from tests.helpers import REPO_ROOT, free_port, http_status


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


def test_bench_launches_measures_and_stops_a_server(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run.json"
    subprocess.run(
        [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--launch",
         f"pdserve serve --host 127.0.0.1 --port {port} --model-path tiny-random",
         "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2",
         "--no-progress", "--label", "launched", "--output", str(out)],
        cwd=REPO_ROOT, check=True, timeout=300, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["completed"] == 2 and result["label"] == "launched"
    assert http_status(url + "/health") is None  # stopped with the run
