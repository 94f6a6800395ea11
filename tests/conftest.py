"""Fixtures shared by every test package: server processes that are always stopped."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from tests.helpers import DEFAULT_START_TIMEOUT_S, ServerProcess, launch_server

TINY_ARGS = ["--model-path", "tiny-random"]


def pytest_configure(config: pytest.Config) -> None:
    """In-process engine tests run on one torch thread, like every pdserve worker: with
    more, OpenMP threads spin against the servers other tests start on the same 2 cores,
    and a 0.1 s test was seen taking 300 s."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def server_factory() -> Iterator:
    """`server_factory(args, env=None, timeout_s=...) -> ServerProcess`; every server it
    started is stopped (process group killed) when the test ends, pass or fail."""
    started: list[ServerProcess] = []

    def start(
        args: Sequence[str],
        env: dict[str, str] | None = None,
        timeout_s: float = DEFAULT_START_TIMEOUT_S,
        **kwargs,
    ) -> ServerProcess:
        server = launch_server(args, env=env, timeout_s=timeout_s, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[ServerProcess]:
    """One colocated tiny-random server (dp_size 1) shared by the route tests."""
    with launch_server([*TINY_ARGS, "--max-running-requests", "16"]) as server:
        yield server
