"""The process helpers every launcher shares: readiness waits and group stops, on real
processes (a Python HTTP server or a sleeper) on loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import pytest

from pdserve import procs

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _start(argv: list[str], stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(argv, start_new_session=True, stdout=stdout)


@pytest.fixture
def http_server():
    port = procs.free_port()
    proc = _start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        procs.stop_group(proc, 5.0)


def test_wait_ready_returns_once_every_url_answers(http_server):
    proc, url = http_server
    assert procs.wait_ready(
        [url + "/", url + "/missing"], [proc], 30.0, optional={url + "/missing"}
    )
    assert procs.http_status(url + "/missing") == 404


def test_wait_ready_raises_as_soon_as_a_watched_process_exits():
    proc = _start([sys.executable, "-c", "raise SystemExit(3)"])
    url = f"http://127.0.0.1:{procs.free_port()}/health"
    with pytest.raises(procs.ProcessExited, match=f"exited with 3 before {url}") as info:
        procs.wait_ready([url], [proc], 30.0)
    assert info.value.proc is proc


def test_wait_ready_gives_up_at_the_deadline_and_when_stopped():
    proc = _start(SLEEPER)
    url = f"http://127.0.0.1:{procs.free_port()}/health"
    try:
        with pytest.raises(procs.NotReady, match="not ready within 0.3 s"):
            procs.wait_ready([url], [proc], 0.3)
        stop = threading.Event()
        stop.set()
        assert procs.wait_ready([url], [proc], 30.0, stop=stop) is False
    finally:
        procs.stop_group(proc, 5.0)


def test_stop_group_kills_a_group_that_ignores_sigterm():
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    argv = [sys.executable, "-c", ignores_term + "print('up', flush=True); time.sleep(120)"]
    proc = _start(argv, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready_line = proc.stdout.readline()  # once it is printed, SIGTERM is ignored
    finally:
        exit_code = procs.stop_group(proc, 0.5)
    assert ready_line == b"up\n"
    assert exit_code == -signal.SIGKILL


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    """Below the range the kernel draws outgoing and port-0 binds from, so nothing but another
    draw can take a port before its server binds it."""
    drawn = [procs.free_port() for _ in range(100)]
    assert len(set(drawn)) == len(drawn)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    if ephemeral_start - 10000 >= 1000:
        assert all(10000 <= port < ephemeral_start for port in drawn)
    for port in drawn[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_do_not_follow_a_seeded_random():
    """Two processes that seed `random` alike (as tests and benchmarks do) draw other ports."""
    code = "import random; from pdserve import procs; random.seed(0); "
    code += "print([procs.free_port() for _ in range(8)])"
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert outputs[0].stdout != outputs[1].stdout, outputs[0].stdout
