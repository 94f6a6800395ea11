"""Fixtures for PD integration tests: prefill and decode servers (tiny-random) that are
ready only once every prefill worker registered with the bootstrap server."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from pdserve.disagg.transfer.nixl_agent import nixl_missing
from tests.helpers import ServerProcess, free_port, launch_server

TINY = ["--model-path", "tiny-random"]

NIXL = pytest.param(
    "nixl",
    marks=pytest.mark.skipif(nixl_missing() is not None, reason=str(nixl_missing())),
    id="nixl",
)
# The KV transfer backends that move bytes, for tests parametrised over them (`backend`).
# NIXL runs a representative subset only: each NIXL server pair costs CI start-up time.
BACKENDS = ["zmq", NIXL]


def backend_args(backend: str) -> list[str]:
    return ["--transfer-backend", backend]


@dataclass
class Prefill:
    server: ServerProcess
    bootstrap_port: int

    @property
    def url(self) -> str:
        return self.server.url


class PDFactory:
    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def prefill(
        self, dp_size: int = 1, args: Sequence[str] = (), env: dict | None = None
    ) -> Prefill:
        bootstrap_port = free_port()
        server = launch_server(
            [
                *TINY,
                "--mode",
                "prefill",
                "--dp-size",
                str(dp_size),
                "--bootstrap-port",
                str(bootstrap_port),
                *args,
            ],
            env=env,
            extra_ready_urls=[f"http://127.0.0.1:{bootstrap_port}/route"],
        )
        self.started.append(server)
        return Prefill(server, bootstrap_port)

    def decode(
        self, dp_size: int = 1, args: Sequence[str] = (), env: dict | None = None
    ) -> ServerProcess:
        server = launch_server(
            [*TINY, "--mode", "decode", "--dp-size", str(dp_size), *args], env=env
        )
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.__exit__(None, None, None)
        self.started.clear()


@pytest.fixture
def pd() -> Iterator[PDFactory]:
    """Starts prefill/decode servers for one test; all are stopped when it ends."""
    factory = PDFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def pd_module() -> Iterator[PDFactory]:
    """Like `pd`, shared by the tests of one module."""
    factory = PDFactory()
    try:
        yield factory
    finally:
        factory.stop_all()
