"""A server's processes at its edges: a start that fails or is stopped, and an exit, leave
no process of the server (fork server included) and none of its directories behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from pdserve.bench import proc_tree
from pdserve.engine.model_dir import resolve_model_dir
from tests.conftest import TINY_ARGS
from tests.helpers import REPO_ROOT, free_port, http_json, python_path_env, wait_until


def start_serve(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`pdserve serve` in a process group of its own (its pgid is its pid), its output in
    `log`: not a pipe, which would be open until its fork server too is gone."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pdserve", "serve", "--port", str(free_port()), *args],
            cwd=REPO_ROOT,
            env={**python_path_env(), "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def left_behind(proc: subprocess.Popen) -> list[proc_tree.ProcInfo]:
    """The processes of `proc`'s group still running (its fork server, its workers)."""
    return proc_tree.live_members({proc.pid})


def model_without_config(tmp_path: Path) -> Path:
    """tiny-random with a config.json that is no JSON: the front end fails on it before it
    starts any worker."""
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model_dir("tiny-random"), model_dir)
    (model_dir / "config.json").write_text("{not json")
    return model_dir


def test_a_failed_start_leaves_no_process_behind(tmp_path):
    """The front end fails before any worker starts while its fork server is still
    importing torch: the fork server went on, an orphan, for seconds after the front end
    had exited."""
    model_dir = model_without_config(tmp_path)
    proc = start_serve(["--model-path", str(model_dir)], tmp_path / "log")
    try:
        proc.wait(120)
        left = left_behind(proc)
    finally:
        proc_tree_kill(proc)
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 1 and "server failed to start" in out, out
    assert left == [], left


def proc_tree_kill(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of `proc`'s group (a test that failed)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(30)


def socket_dirs(pid: int) -> set[str]:
    return {
        os.path.dirname(c.laddr)
        for c in psutil.Process(pid).net_connections("unix")
        if "/pdserve-" in c.laddr
    }


def test_sigterm_while_the_workers_start_stops_the_server_cleanly(tmp_path):
    """SIGTERM before the server is ready (a worker frozen in its start): the front end
    stops its workers, removes its socket directory and exits 0. It died of the signal's
    default action instead, its directory left for the next server. A spawned worker,
    which imports torch for seconds: a fork server's may be ready before it is frozen."""
    spawn = {"PDSERVE_WORKER_MULTIPROC_METHOD": "spawn"}
    proc = start_serve([*TINY_ARGS], tmp_path / "log", spawn)
    try:
        wait_until(lambda: proc_tree.worker_pids(proc.pid), 60, "the worker to start")
        (worker,) = proc_tree.worker_pids(proc.pid)
        os.kill(worker, signal.SIGSTOP)  # never ready: the server stays in its start
        dirs = socket_dirs(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
        left = left_behind(proc)
    finally:
        proc_tree_kill(proc)
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0 and "stopped while starting" in out, (proc.returncode, out)
    assert "Traceback" not in out, out
    assert left == [], left
    assert dirs and not any(os.path.exists(d) for d in dirs), dirs


def test_a_tmpdir_too_long_for_the_fork_servers_socket_starts_workers_by_spawn(tmp_path):
    """Every start failed in a traceback, "OSError: AF_UNIX path too long", under a
    $TMPDIR where the fork server's socket path does not fit (the workers' own links fall
    back to loopback ports there). The server now spawns its workers instead, and says so;
    the start here goes on to fail on its model, not on the fork server."""
    tmpdir = tmp_path / ("d" * (100 - len(str(tmp_path))))
    tmpdir.mkdir()
    model_dir = model_without_config(tmp_path)
    log = tmp_path / "log"
    proc = start_serve(["--model-path", str(model_dir)], log, {"TMPDIR": str(tmpdir)})
    try:
        proc.wait(120)
    finally:
        proc_tree_kill(proc)
    out = log.read_text()
    assert "workers start by spawn, not from a fork server" in out, out
    assert proc.returncode == 1 and "server failed to start: Expecting property" in out, out
    assert "Traceback" not in out, out


def test_workers_killed_with_their_fork_server_are_reported_so(server_factory):
    """The fork server's death kills its workers (each dies with its parent); they were
    reported as "exited unexpectedly with code 255", multiprocessing's code for a worker
    whose fork server is gone, which named no cause."""
    server = server_factory(TINY_ARGS)
    (worker,) = proc_tree.worker_pids(server.pid)
    fork_server = proc_tree.info(worker).ppid
    os.kill(fork_server, signal.SIGKILL)
    wait_until(lambda: http_json("GET", f"{server.url}/health")[0] == 503, 30, "health 503")
    message = http_json("GET", f"{server.url}/health")[1]["error"]["message"]
    assert message == "worker 0 was killed with its fork server, which was killed by signal 9"
