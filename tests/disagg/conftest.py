"""Fixtures for PD integration tests: prefill and decode servers (tiny-random) that are
ready only once every prefill worker registered with the bootstrap server."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from pdserve.disagg.transfer.nixl_agent import nixl_missing
from pdserve.netaddr import http_url
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
    """Starts prefill/decode servers listening on `host` (an IPv6 literal too)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.started: list[ServerProcess] = []

    def prefill(
        self,
        dp_size: int = 1,
        args: Sequence[str] = (),
        env: dict | None = None,
        port: int | None = None,
        bootstrap_port: int | None = None,
    ) -> Prefill:
        """`port` and `bootstrap_port` (free ones by default): a restart on the same ports."""
        bootstrap_port = bootstrap_port or free_port(self.host)
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
            port=port,
            extra_ready_urls=[http_url(self.host, bootstrap_port) + "/route"],
            host=self.host,
        )
        self.started.append(server)
        return Prefill(server, bootstrap_port)

    def decode(
        self, dp_size: int = 1, args: Sequence[str] = (), env: dict | None = None
    ) -> ServerProcess:
        server = launch_server(
            [*TINY, "--mode", "decode", "--dp-size", str(dp_size), *args], env=env, host=self.host
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


class PDPairs:
    """Prefill + decode pairs of one module, started when a test first asks for a
    configuration and handed to every later test that asks for the same one. Prefill and
    decode servers are kept apart, by their own configuration: pairs that differ on one
    side share the other's server (a decode serves many prefills, as in production). A
    test that takes a pair must leave both servers running and idle (nothing killed, frozen
    or held): each server start costs CI seconds of CPU, a shared one costs one."""

    def __init__(self, factory: PDFactory) -> None:
        self.factory = factory
        self.prefills: dict[tuple, Prefill] = {}
        self.decodes: dict[tuple, ServerProcess] = {}

    def get(
        self,
        prefill_dp: int = 1,
        decode_dp: int = 1,
        prefill_args: Sequence[str] = (),
        decode_args: Sequence[str] = (),
    ) -> tuple[Prefill, ServerProcess]:
        prefill_key = (prefill_dp, tuple(prefill_args))
        if prefill_key not in self.prefills:
            self.prefills[prefill_key] = self.factory.prefill(prefill_dp, prefill_args)
        decode_key = (decode_dp, tuple(decode_args))
        if decode_key not in self.decodes:
            self.decodes[decode_key] = self.factory.decode(decode_dp, decode_args)
        prefill, decode = self.prefills[prefill_key], self.decodes[decode_key]
        key = (prefill_key, decode_key)
        assert prefill.server.alive() and decode.alive(), f"a test stopped shared pair {key}"
        return prefill, decode


@pytest.fixture(scope="module")
def pd_pairs(pd_module) -> PDPairs:
    """The module's shared prefill + decode pairs, keyed by configuration (`PDPairs`)."""
    return PDPairs(pd_module)
