"""Fixtures of the router tests: stub workers and routers as real processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from pdserve.netaddr import http_url
from tests.helpers import PYTHON, ServerProcess, free_port, launch_server

# What each test may have changed on a stub, as it was at its start.
STUB_DEFAULTS = {
    "reset": True,
    "health_status": 200,
    "load_tokens": 0,
    "info_hold": None,
    "kv_events": False,
    "flush_status": 200,
}


class StubWorker:
    def __init__(self, name: str, role: str, dp_size: int = 1):
        self.name, self.role, self.dp_size = name, role, dp_size
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ServerProcess([], [f"{self.url}/health"], url=self.url)
        self.proc.argv = [
            PYTHON,
            "-m",
            "tests.router.stub_worker",
            "--port",
            str(self.port),
            "--name",
            name,
            "--role",
            role,
            "--dp-size",
            str(dp_size),
        ]

    def control(self, **fields) -> None:
        requests.post(f"{self.url}/stub/control", json=fields, timeout=5).raise_for_status()

    def release(self, gate: str) -> None:
        self.control(gate=gate)

    def log(self) -> dict:
        return requests.get(f"{self.url}/stub/log", timeout=5).json()


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubWorker]]:
    """Two prefill stubs (p1 with DP 2) and two decode stubs (d2 with DP 4)."""
    workers = {
        "p1": StubWorker("p1", "prefill", dp_size=2),
        "p2": StubWorker("p2", "prefill"),
        "d1": StubWorker("d1", "decode"),
        "d2": StubWorker("d2", "decode", dp_size=4),
    }
    try:
        for w in workers.values():
            w.proc.start(timeout_s=30)
        yield workers
    finally:
        for w in workers.values():
            w.proc.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _fresh_stubs(request) -> None:
    """Each test starts from empty stub logs and healthy stubs."""
    if "stubs" in request.fixturenames:
        for w in request.getfixturevalue("stubs").values():
            w.control(**STUB_DEFAULTS, dp_size=w.dp_size)


def router_args(prefills=(), decodes=(), workers=()) -> list[str]:
    args: list[str] = []
    for url, bootstrap_port in prefills:
        args += ["--prefill", url] + ([str(bootstrap_port)] if bootstrap_port else [])
    for url in decodes:
        args += ["--decode", url]
    for url in workers:
        args += ["--worker", url]
    return args


def start_router(
    args: list[str], timeout_s: float = 60.0, host: str = "127.0.0.1"
) -> ServerProcess:
    """`pdserve router` on a free port of `host`; returns once GET /readiness answers 200."""
    port = free_port(host)
    return launch_server(
        ["--health-check-interval-s", "0.2", *args],
        subcommand="router",
        port=port,
        timeout_s=timeout_s,
        extra_ready_urls=[http_url(host, port) + "/readiness"],
        host=host,
    )


@pytest.fixture
def router_factory() -> Iterator:
    started: list[ServerProcess] = []

    def start(args: list[str], timeout_s: float = 60.0) -> ServerProcess:
        router = start_router(args, timeout_s)
        started.append(router)
        return router

    yield start
    for router in started:
        router.__exit__(None, None, None)
