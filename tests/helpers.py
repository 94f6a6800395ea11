"""Process fixtures shared by every integration test: free ports, a server subprocess with a
readiness wait and a guaranteed stop, and small HTTP helpers.

Usage: `with launch_server(["--model-path", "tiny-random"]) as srv: requests to srv.url`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from pdserve import procs
from pdserve.netaddr import http_url
from pdserve.procs import free_port as free_port  # re-exported for the tests
from pdserve.procs import http_status as http_status

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_START_TIMEOUT_S = 120.0


def http_json(
    method: str,
    url: str,
    body: Any = None,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, parsed JSON or raw text) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def open_sse(url: str, body: Any, timeout_s: float = 60.0) -> Any:
    """POST `body`; the open response once its stream has started (200 and headers in: a
    server sends them with its first output). Read it with `read_sse`. AssertionError if
    the answer is not a stream."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    resp = urllib.request.urlopen(req, timeout=timeout_s)
    if not resp.headers["Content-Type"].startswith("text/event-stream"):
        resp.close()
        raise AssertionError(f"not a stream: {resp.headers}")
    return resp


def read_sse(resp: Any) -> list[Any]:
    """The rest of an open stream, then closed: parsed `data:` payloads, with the final
    "[DONE]" kept as the string."""
    events: list[Any] = []
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def sse_events(url: str, body: Any, timeout_s: float = 60.0) -> list[Any]:
    """POST `body` and collect a server-sent-event stream (`read_sse`). AssertionError if
    the answer is not a stream."""
    return read_sse(open_sse(url, body, timeout_s))


def raw_exchange(url: str, data: bytes, timeout_s: float = 30.0) -> bytes:
    """Send raw bytes without closing our side (a client still sending); what the server
    answers, up to its first JSON body, its close or the timeout (a hang: no status line)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
    return answer


def checks_answered_while_pending(url: str, path: str, body: Any) -> tuple[bytes, int]:
    """POST `body` to `path` on a socket of its own and GET /health, one after another, until
    its answer comes: (the start of that answer, the health checks answered meanwhile). A
    request that holds the event loop lets none through."""
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as pending:
        pending.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        answered = 0
        with requests.Session() as health:
            while not select.select([pending], [], [], 0)[0]:
                assert health.get(f"{url}/health", timeout=60).status_code == 200
                answered += 1
        return pending.recv(65536), answered


def send_part_and_leave(url: str, method: str, path: str, reset: bool) -> None:
    """Announce a 1000-byte body, send a few bytes of it, and close the connection (with a
    TCP reset when `reset`): a router or client dropping a request while the server reads it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + b'Content-Length: 1000\r\n\r\n{"text": "hel')


def ipv6_loopback_missing() -> str | None:
    """Why this machine cannot listen on ::1 (no IPv6, or IPv6 disabled), else None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback on this machine: {exc}"
    return None


def python_path_env() -> dict[str, str]:
    """os.environ with the repo root first on PYTHONPATH (kept: packages installed outside
    site-packages stay importable in spawned servers)."""
    inherited = os.environ.get("PYTHONPATH")
    path = str(REPO_ROOT) if not inherited else os.pathsep.join([str(REPO_ROOT), inherited])
    return {**os.environ, "PYTHONPATH": path}


def wait_healthy_and_idle(url: str, health_timeout_s: float = 30.0) -> None:
    """The server at `url` answers /health 200 again, then every DP rank of it holds 0
    requests and 0 pages (what a worker that came back must leave)."""
    health = lambda: http_json("GET", f"{url}/health")[0] == 200  # noqa: E731
    wait_until(health, health_timeout_s, "health again")
    wait_until(
        lambda: all(
            r["num_reqs"] == 0 and r["num_used_pages"] == 0
            for r in http_json("GET", f"{url}/get_load")[1]
        ),
        30,
        "every worker idle",
    )


def wait_until(
    cond: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll `cond` until true; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class ServerProcess:
    """A `python -m pdserve <subcommand> ...` subprocess in its own process group.

    `ready_urls` are polled until each answers 200; the process's output goes to a temp
    file whose tail is shown when it dies or does not become ready in time.
    """

    def __init__(
        self,
        argv: Sequence[str],
        ready_urls: Sequence[str],
        env: dict[str, str] | None = None,
        url: str | None = None,
    ):
        self.argv = [PYTHON, "-m", "pdserve", *argv]
        self.ready_urls = list(ready_urls)
        self.url = url or (self.ready_urls[0].rsplit("/", 1)[0] if self.ready_urls else "")
        self.env = {
            **python_path_env(),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log = tempfile.NamedTemporaryFile(prefix="pdserve-test-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            procs.wait_ready(self.ready_urls, [self.proc], timeout_s)
        except (procs.ProcessExited, procs.NotReady) as exc:
            tail = self.output_tail()
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv[2:])}: {exc}:\n{tail}") from None
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def output_tail(self, num_chars: int = 6000) -> str:
        return procs.log_tail(self.log.name, num_chars)

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.signal_group(self.proc.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it at the deadline; returns the exit code."""
        if self.proc is None:
            return None
        return procs.stop_group(self.proc, timeout_s)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def launch_server(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    port: int | None = None,
    extra_ready_urls: Sequence[str] = (),
    subcommand: str = "serve",
    host: str = "127.0.0.1",
) -> ServerProcess:
    """Start `pdserve serve` on `host`:`port` (free by default) with `args`; returns once
    GET /health and every `extra_ready_urls` answer 200. Stop it with `.stop()` or `with`."""
    port = port or free_port(host)
    argv = [subcommand, "--host", host, "--port", str(port), *args]
    url = http_url(host, port)
    server = ServerProcess(argv, [f"{url}/health", *extra_ready_urls], env=env, url=url)
    return server.start(timeout_s)
