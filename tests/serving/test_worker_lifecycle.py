"""A server's processes at its edges: a start that fails or is stopped, and an exit, leave
no process of the server (fork server included) and none of its directories behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from pdserve.bench import proc_tree
from pdserve.engine.model_dir import resolve_model_dir
from tests.conftest import TINY_ARGS
from tests.helpers import (
    REPO_ROOT,
    free_port,
    http_json,
    http_status,
    open_sse,
    python_path_env,
    read_sse,
    wait_until,
)

PR_SET_CHILD_SUBREAPER = 36


def start_serve(
    args: list[str], log: Path, env: dict[str, str] | None = None, port: int | None = None
) -> subprocess.Popen:
    """`pdserve serve` in a process group of its own (its pgid is its pid), its output in
    `log`: not a pipe, which would be open until its fork server too is gone."""
    port = port or free_port()
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pdserve", "serve", "--port", str(port), *args],
            cwd=REPO_ROOT,
            env={**python_path_env(), "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def left_behind(proc: subprocess.Popen) -> list[proc_tree.ProcInfo]:
    """The processes of `proc`'s group still running (its fork server, its workers)."""
    return proc_tree.live_members({proc.pid})


@contextlib.contextmanager
def orphan_witness() -> Iterator[Callable[[], list[int]]]:
    """Makes this process the reaper of the orphans of the processes it starts meanwhile
    (PR_SET_CHILD_SUBREAPER): an orphan becomes its child, and stays its zombie once it
    exits. Yields what lists them, however briefly they outlived their parent."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = {p.pid for p in proc_tree.processes() if p.ppid == os.getpid()}
    adopted: list[int] = []

    def orphans() -> list[int]:
        found = [p.pid for p in proc_tree.processes() if p.ppid == os.getpid()]
        adopted.extend(pid for pid in found if pid not in own and pid not in adopted)
        return list(adopted)

    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        yield orphans
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
        for pid in orphans():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


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
    with orphan_witness() as orphans:
        proc = start_serve(["--model-path", str(model_dir)], tmp_path / "log")
        try:
            proc.wait(120)
            left = orphans()
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
    stops its workers, removes its socket directory and exits 0, its helpers (the
    resource tracker) reaped first. It died of the signal's default action instead, its
    directory left for the next server. A spawned worker,
    which imports torch for seconds: a fork server's may be ready before it is frozen."""
    spawn = {"PDSERVE_WORKER_MULTIPROC_METHOD": "spawn"}
    with orphan_witness() as orphans:
        proc = start_serve([*TINY_ARGS], tmp_path / "log", spawn)
        try:
            wait_until(lambda: proc_tree.worker_pids(proc.pid), 60, "the worker to start")
            (worker,) = proc_tree.worker_pids(proc.pid)
            os.kill(worker, signal.SIGSTOP)  # never ready: the server stays in its start
            dirs = socket_dirs(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            left = orphans()
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
    failed = f"server failed to start: {model_dir / 'config.json'} is not valid JSON: Expecting"
    assert proc.returncode == 1 and failed in out, out
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


def test_a_dead_workers_health_503_is_the_openai_error_object(server_factory):
    """docs/protocol.md: every HTTP error body of a server is {"error": {"message", "type",
    "param", "code"}}; /health and /health_generate answered a dead worker's 503 with the
    message alone."""
    server = server_factory(TINY_ARGS)
    (worker,) = proc_tree.worker_pids(server.pid)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: http_json("GET", f"{server.url}/health")[0] == 503, 30, "health 503")
    want = {
        "message": "worker 0 exited unexpectedly with code -9",
        "type": "server_error",
        "param": None,
        "code": 503,
    }
    for path in ("/health", "/health_generate"):
        status, answer = http_json("GET", f"{server.url}{path}")
        assert status == 503 and answer == {"error": want}, (path, answer)


def test_a_second_sigterm_fails_the_requests_in_flight_with_503_and_the_server_exits(tmp_path):
    """On SIGTERM the server takes no new request and lets those in flight run (here for
    up to --shutdown-timeout-s 600 s); a second SIGTERM fails them with a 503, a stream
    with an error event. aiohttp alone waited for them twice its 60 s shutdown timeout,
    deaf to a second signal, then dropped the connections with no answer."""
    log, port = tmp_path / "log", free_port()
    proc = start_serve([*TINY_ARGS, "--shutdown-timeout-s", "600"], log, port=port)
    url = f"http://127.0.0.1:{port}"
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
    try:
        wait_until(lambda: http_status(f"{url}/health") == 200, 120, "the server to be ready")
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(http_json, "POST", f"{url}/generate", body)
            stream = open_sse(f"{url}/generate", {**body, "stream": True}, 30)
            running = lambda: http_json("GET", f"{url}/get_load")[1][0]["num_reqs"] == 2  # noqa: E731
            wait_until(running, 30, "both requests to run")
            os.kill(proc.pid, signal.SIGTERM)
            wait_until(lambda: "shutting down: 2 requests" in log.read_text(), 30, "the drain")
            os.kill(proc.pid, signal.SIGTERM)
            status, answer = plain.result(60)
            events = read_sse(stream)
        proc.wait(60)
        left = left_behind(proc)
    finally:
        proc_tree_kill(proc)
    shutting_down = "the server is shutting down"
    assert status == 503 and answer["error"]["message"] == shutting_down, (status, answer)
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == shutting_down, events
    assert proc.returncode == 0 and left == [], (proc.returncode, left)


def test_a_sigterm_to_the_whole_group_drains_the_requests_in_flight(tmp_path):
    """systemd stops a service, and `pdserve up` a server, by SIGTERM to its whole process
    group: the workers and the fork server got it too and died at once, so the front end's
    drain had nothing to drain and every request in flight failed with a 500 naming its
    worker. They ignore SIGTERM now; the front end drains, then stops them."""
    log, port = tmp_path / "log", free_port()
    proc = start_serve(
        [*TINY_ARGS, "--dp-size", "2", "--shutdown-timeout-s", "600"], log, port=port
    )
    url = f"http://127.0.0.1:{port}"
    body = {"text": "x", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    try:
        wait_until(lambda: http_status(f"{url}/health") == 200, 120, "the server to be ready")
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(http_json, "POST", f"{url}/generate", body) for _ in range(2)]
            load = lambda: sum(r["num_reqs"] for r in http_json("GET", f"{url}/get_load")[1])  # noqa: E731
            wait_until(lambda: load() == 2, 30, "both requests to run")
            os.killpg(proc.pid, signal.SIGTERM)
            results = [answer.result(120) for answer in answers]
        proc.wait(60)
        left = left_behind(proc)
    finally:
        proc_tree_kill(proc)
    for status, answer in results:
        assert status == 200 and len(answer["output_ids"]) == 400, (status, answer)
    assert "shutting down: 2 requests" in log.read_text()
    assert proc.returncode == 0 and left == [], (proc.returncode, left)


READY = "pdserve colocated server on http://"  # the server's line once it serves


def fork_server_of(frontend_pid: int) -> int | None:
    kids = [p for p in proc_tree.processes() if p.ppid == frontend_pid and p.state != "Z"]
    found = [p.pid for p in kids if "multiprocessing.forkserver" in p.cmdline]
    return found[0] if found else None


@pytest.mark.parametrize("end", ["deadline", "sigterm", "killed"])
def test_a_stopped_fork_server_ends_the_start_at_its_deadline_or_on_sigterm(tmp_path, end):
    """The fork server stopped (SIGSTOP) before it forked a worker: it is still importing
    torch when found, and a stopped process answers nothing. The front end waited for it
    on the event loop with no deadline, deaf to --worker-start-timeout-s and to SIGTERM.
    Now the start fails at that deadline, the fork server killed, or a SIGTERM stops the
    server meanwhile; either way no process is left. A fork server killed meanwhile failed
    the start in an EOFError's traceback; it is named now."""
    log = tmp_path / "log"
    # Only the deadline case waits it out; the others end the start well before theirs (a
    # 5 s one could pass first on a loaded machine, and the start end at the deadline).
    timeout_s = "5" if end == "deadline" else "120"
    with orphan_witness() as orphans:
        proc = start_serve([*TINY_ARGS, "--worker-start-timeout-s", timeout_s], log)
        try:
            wait_until(lambda: fork_server_of(proc.pid), 60, "the fork server", 0.002)
            fork_server = fork_server_of(proc.pid)
            os.kill(fork_server, signal.SIGSTOP)
            assert proc_tree.worker_pids(proc.pid) == []  # it had forked none
            came_up = False
            if end != "deadline":
                starting = lambda: "starting 1 worker process(es)" in log.read_text()  # noqa: E731
                wait_until(starting, 60, "the front end to ask the fork server for a worker")
                os.kill(*(proc.pid, signal.SIGTERM) if end == "sigterm" else (fork_server, 9))
            if end == "killed":
                # The start's thread logs first, then asks the fork server; on a loaded
                # machine the kill can land before it asks, and multiprocessing then starts
                # a new fork server, which serves: that start must end well too.
                ended_or_up = lambda: proc.poll() is not None or READY in log.read_text()  # noqa: E731
                wait_until(ended_or_up, 90, "the start to fail or the server to come up")
                if proc.poll() is None:
                    came_up = True
                    os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            left = orphans()
        finally:
            proc_tree_kill(proc)
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(fork_server, signal.SIGKILL)
    out = log.read_text()
    if end == "deadline":
        expected = f"the fork server (pid {fork_server}) did not start the workers within 5 s"
        assert proc.returncode == 1 and expected in out, (proc.returncode, out)
    elif end == "sigterm":
        assert proc.returncode == 0 and "stopped while starting" in out, (proc.returncode, out)
    elif came_up:
        assert proc.returncode == 0, (proc.returncode, out)
    else:
        expected = (
            "starting the workers failed: unexpected EOF (the fork server was killed by signal 9)"
        )
        assert proc.returncode == 1 and expected in out, (proc.returncode, out)
    assert "Traceback" not in out, out
    assert left == [], left
