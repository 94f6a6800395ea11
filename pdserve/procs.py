"""Child-process helpers: free ports, a readiness wait with a deadline, process-group stops,
dying with the parent. Nothing PD specific; used by `pdserve up`, `pdserve bench --launch`,
a server's worker processes and the tests, in whichever process starts children.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence

from pdserve import netaddr

_PR_SET_PDEATHSIG = 1


class ProcessExited(RuntimeError):
    """A watched process ended before what it was to serve was ready."""

    def __init__(self, proc: subprocess.Popen, url: str):
        super().__init__(f"exited with {proc.returncode} before {url} was ready")
        self.proc, self.url = proc, url


class NotReady(TimeoutError):
    def __init__(self, url: str, timeout_s: float):
        super().__init__(f"{url} not ready within {timeout_s:g} s")
        self.url = url


# Ports for servers we start are drawn below the kernel's ephemeral range: a port taken
# from it (bind to port 0) is free when drawn but may go, before the server binds it, to an
# outgoing connection or to another bind to port 0 (ZeroMQ's `tcp://host:*`), which draw
# from that range only. Below it, only another process drawing the same port can take it.
_LOWEST_PORT = 10000
_MIN_PORTS_TO_DRAW = 1000
_handed_out: set[int] = set()  # a port is drawn once per process
_rng = random.SystemRandom()  # never follows a seed a test or benchmark gave `random`


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, drawn at random below the ephemeral range (or from
    the OS where that leaves too few ports) and never twice in this process."""
    top = _ephemeral_start()
    if top - _LOWEST_PORT >= _MIN_PORTS_TO_DRAW:
        for _ in range(100):
            port = _rng.randrange(_LOWEST_PORT, top)
            if port not in _handed_out and port_is_free(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(netaddr.family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind `port` now (SO_REUSEADDR, like the router's)."""
    with socket.socket(netaddr.family(host)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def http_status(
    url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None
) -> int | None:
    """The status of GET url, or None when nothing answers."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # URLError, refused, reset, timed out
        return None


def wait_ready(
    urls: Sequence[str],
    procs: Sequence[subprocess.Popen],
    timeout_s: float,
    *,
    optional: Collection[str] = (),
    interval_s: float = 0.1,
    stop: threading.Event | None = None,
    status_timeout_s: float = 2.0,
    headers: dict[str, str] | None = None,
) -> bool:
    """Poll `urls` in order until each answers 200 (or 404, for those in `optional`).
    Raises ProcessExited as soon as one of `procs` ends, NotReady at the deadline; returns
    False if `stop` is set first."""
    deadline = time.monotonic() + timeout_s
    for url in urls:
        ok = {200, 404} if url in optional else {200}
        while http_status(url, status_timeout_s, headers) not in ok:
            for proc in procs:
                if proc.poll() is not None:
                    raise ProcessExited(proc, url)
            if time.monotonic() > deadline:
                raise NotReady(url, timeout_s)
            if stop is None:
                time.sleep(interval_s)
            elif stop.wait(interval_s):
                return False
    return True


def log_tail(path: str, num_chars: int) -> str:
    """The end of a child's log file, to show why it died or never became ready."""
    with open(path, errors="replace") as f:
        return f.read()[-num_chars:]


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid`; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_group(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGTERM the process group that `proc` leads, SIGKILL it at the deadline, and SIGKILL
    whatever of the group outlived its leader (workers); returns the leader's exit code."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
    signal_group(proc.pid, signal.SIGKILL)
    return proc.wait(timeout_s)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child (or a `preexec_fn`): receive `sig` when the parent dies, even by SIGKILL.
    Linux only; elsewhere nothing happens, so callers keep their own parent check."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass
