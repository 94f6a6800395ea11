"""Hypothesis profiles of the fuzz tests and the server set they share per module.

`ci` (the default) keeps the example counts small; `long` is the soak:
`python -m pytest tests/fuzz --hypothesis-profile long`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

from tests.disagg.conftest import PDFactory, Prefill
from tests.helpers import ServerProcess, free_port, launch_server

# A chat without max_tokens may fill the context: a short one keeps such answers quick.
CONTEXT = ["--context-length", "256"]
TINY = ["--model-path", "tiny-random", *CONTEXT]
# A lone PD leg waits for its peer at most this long (a deadline, not a hang).
PD_ARGS = ["--bootstrap-timeout-s", "3", "--kv-wait-timeout-s", "3", *CONTEXT]

_COMMON = dict(
    deadline=None,  # servers on 2 shared cores: a slow example is load, not a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("ci", max_examples=10, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile("ci")


@dataclass
class Servers:
    colocated: ServerProcess
    prefill: Prefill
    decode: ServerProcess
    router: ServerProcess


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A colocated server, a prefill (DP 2) + decode pair and a router over that pair."""
    factory = PDFactory()
    started: list[ServerProcess] = []
    try:
        colocated = launch_server([*TINY, "--max-running-requests", "16"])
        started.append(colocated)
        prefill = factory.prefill(2, PD_ARGS)
        decode = factory.decode(1, PD_ARGS)
        port = free_port()
        router = ServerProcess(
            ["router", "--host", "127.0.0.1", "--port", str(port),
             "--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url],
            [f"http://127.0.0.1:{port}/readiness"],
        ).start(60)  # fmt: skip
        started.append(router)
        yield Servers(colocated, prefill, decode, router)
    finally:
        for server in started:
            server.__exit__(None, None, None)
        factory.stop_all()
