"""Bootstrap clients against a real aiohttp site on a free loopback port in the test's loop
(the way the prefill front end hosts it), and against servers that answer garbage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from pdserve.disagg.bootstrap_client import (
    BootstrapClientError,
    bootstrap_url,
    fetch_server_info,
    fetch_worker,
    query_dp_ranks,
    register_worker_blocking,
)
from pdserve.disagg.bootstrap_registry import (
    BootstrapRegistry,
    RoomFailure,
    ServerInfo,
    WorkerRegistration,
)
from pdserve.disagg.bootstrap_server import start_bootstrap_server
from tests.disagg.bootstrap_fixtures import registration as base_registration
from tests.helpers import free_port

TIMEOUT_S = 5.0


def registration(dp_rank: int, **overrides) -> WorkerRegistration:
    overrides.setdefault("load_balance_method", "follow_bootstrap_room")
    return base_registration(dp_rank, **overrides)


async def wait_for(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0.01)  # polling interval of a deadline-bounded wait


def test_async_helpers_follow_the_registry_the_controller_writes():
    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=60.0, dp_size=2)
        server = await start_bootstrap_server(registry, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(BootstrapClientError) as err:
                    await fetch_server_info(session, server.url, TIMEOUT_S)
                assert err.value.status == 503 and err.value.retryable
                assert "no prefill worker" in str(err.value)
                for rank in range(2):
                    await asyncio.to_thread(
                        register_worker_blocking, server.url, registration(rank), TIMEOUT_S
                    )
                info = await fetch_server_info(session, server.url, TIMEOUT_S)
                assert isinstance(info, ServerInfo)
                assert info.layout() == registration(0).layout()
                assert info.follow_bootstrap_room and info.needs_rank_query
                worker = await fetch_worker(session, server.url, 1, TIMEOUT_S)
                assert worker.kv_endpoint == "tcp://127.0.0.1:6001"
                with pytest.raises(BootstrapClientError) as err:
                    await fetch_worker(session, server.url, 5, TIMEOUT_S)
                assert err.value.status == 404 and not err.value.retryable
                # The DP controller shares the process: it writes the registry directly.
                registry.register_room(70, 1, now=time.monotonic())
                registry.record_failure(71, "conflict", 400, now=time.monotonic())
                answer = await query_dp_ranks(session, server.url, [70, 71, 72], TIMEOUT_S)
                assert answer == {70: 1, 71: RoomFailure("conflict", 400)}
                assert registry.stats()["queries"] == 1
        finally:
            await server.stop()
        assert registry.stats()["registrations"] == 2

    asyncio.run(scenario())


def test_blocking_registration_retries_until_the_server_starts():
    """The worker may start before the front end binds the bootstrap port."""

    async def scenario() -> None:
        port = free_port()
        url = bootstrap_url("127.0.0.1", port)
        num_refused = 0

        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal num_refused
            num_refused += 1
            writer.close()

        stand_in = await asyncio.start_server(reset, "127.0.0.1", port)
        registering = asyncio.create_task(
            asyncio.to_thread(register_worker_blocking, url, registration(0), 10.0)
        )
        await wait_for(lambda: num_refused >= 1)
        stand_in.close()
        await stand_in.wait_closed()
        registry = BootstrapRegistry(room_ttl_s=60.0)
        server = await start_bootstrap_server(registry, "127.0.0.1", port)
        try:
            await asyncio.wait_for(registering, timeout=10.0)
            assert registry.worker(0)["kv_endpoint"] == "tcp://127.0.0.1:6000"
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_blocking_registration_fails_at_once_on_contradiction():
    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=60.0)
        registry.register_worker(registration(0), now=0.0)
        server = await start_bootstrap_server(registry, "127.0.0.1", 0)
        try:
            started = time.monotonic()
            with pytest.raises(BootstrapClientError) as err:
                await asyncio.to_thread(
                    register_worker_blocking, server.url, registration(1, page_size=32), 30.0
                )
            # A 400 cannot heal by retrying, so no waiting out the 30 s deadline.
            assert time.monotonic() - started < 15.0
        finally:
            await server.stop()
        assert err.value.status == 400
        assert "page_size: registered=16 worker(dp_rank=1)=32" in str(err.value)
        assert "was refused by" in str(err.value) and "within" not in str(err.value)

    asyncio.run(scenario())


def test_blocking_registration_gives_up_at_its_deadline():
    url = bootstrap_url("127.0.0.1", free_port())  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BootstrapClientError) as err:
        register_worker_blocking(url, registration(0), timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 5.0  # tried until the deadline, no longer
    assert err.value.status is None and "within 0.3s could not register" in str(err.value)


def test_periodic_expiry_drops_idle_rooms_and_stop_releases_the_port():
    clock_s = [0.0]

    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=5.0, dp_size=2)
        server = await start_bootstrap_server(
            registry, "127.0.0.1", 0, now=lambda: clock_s[0], expire_interval_s=0.01
        )
        async with aiohttp.ClientSession() as session:
            try:
                registry.register_room(1, 0, now=0.0)
                registry.register_room(2, 1, now=0.0)
                clock_s[0] = 4.0
                assert await query_dp_ranks(session, server.url, [1], TIMEOUT_S) == {1: 0}
                clock_s[0] = 6.0  # room 2 idle 6 s > TTL; room 1 used 2 s ago
                await wait_for(lambda: registry.stats()["expirations"] == 1)
                assert await query_dp_ranks(session, server.url, [1, 2], TIMEOUT_S) == {1: 0}
            finally:
                await server.stop()
            with pytest.raises(BootstrapClientError) as err:
                await query_dp_ranks(session, server.url, [1], TIMEOUT_S)
            assert err.value.status is None and err.value.retryable

    asyncio.run(scenario())


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _answer(status: int, body: bytes) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    return handler


async def _call_helper(name: str, session: aiohttp.ClientSession, url: str) -> object:
    if name == "server_info":
        return await fetch_server_info(session, url, TIMEOUT_S)
    if name == "worker":
        return await fetch_worker(session, url, 0, TIMEOUT_S)
    return await query_dp_ranks(session, url, [5], TIMEOUT_S)


@pytest.mark.parametrize(
    ("helper", "status", "body", "expected_status"),
    [
        ("server_info", 200, b"not json", None),
        ("server_info", 200, b'{"dp_size": "2"}', None),
        ("server_info", 500, b"<html>oops</html>", 500),
        ("worker", 200, b'{"kv_endpoint": 5}', None),
        ("worker", 200, b"[" * 100_000, None),
        ("ranks", 200, b'{"abc": 1}', None),
        ("ranks", 200, b'{"6": 1}', None),  # a room that was not asked for
        ("ranks", 200, b'{"5": "x"}', None),
        ("ranks", 400, b'{"error": {"message": "bad rooms"}}', 400),
    ],
)
def test_async_helpers_raise_one_clear_error_on_bad_answers(helper, status, body, expected_status):
    async def scenario() -> BootstrapClientError:
        app = web.Application()
        handler = _answer(status, body)
        app.router.add_get("/route", handler)
        app.router.add_post("/query_dp_ranks", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = bootstrap_url("127.0.0.1", runner.addresses[0][1])
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(BootstrapClientError) as err:
                    await _call_helper(helper, session, url)
            return err.value
        finally:
            await runner.cleanup()

    error = asyncio.run(scenario())
    assert error.status == expected_status
    if expected_status == 400:
        assert "bad rooms" in str(error)


def test_bootstrap_url_brackets_ipv6_hosts():
    assert bootstrap_url("10.0.0.1", 8998) == "http://10.0.0.1:8998"
    assert bootstrap_url("::1", 8998) == "http://[::1]:8998"
    assert bootstrap_url("[::1]", 8998) == "http://[::1]:8998"  # as a client may send it


def test_a_refused_bootstrap_server_fails_in_about_a_second_naming_it():
    """Nothing listens: a fact, not a reason to wait out the 30 s deadline."""
    from pdserve.disagg.bootstrap_client import fetch_server_info
    from pdserve.disagg.peer_info import UNREACHABLE_AFTER_S, call_with_retry
    from pdserve.serving.hooks import RequestError

    url = f"http://127.0.0.1:{free_port()}"

    async def main() -> tuple[RequestError, float]:
        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            with pytest.raises(RequestError) as info:
                await call_with_retry(
                    lambda t: fetch_server_info(session, url, t), f"server {url}", 30.0
                )
            return info.value, time.monotonic() - start

    error, elapsed_s = asyncio.run(main())
    assert error.status == 503 and "unreachable" in error.message and url in error.message
    assert UNREACHABLE_AFTER_S <= elapsed_s < 3.0


def test_a_rank_query_answered_by_another_start_of_the_server_fails_at_once():
    """Decode resolved the room on server info of another start of the prefill server (one
    that registered every room): the answering start, which may never register it, says its
    epoch, and the room fails as stale at once instead of waiting out its deadline."""
    from pdserve.disagg.metrics import DisaggMetrics
    from pdserve.disagg.peer_info import PeerDirectory, StalePrefillInfo
    from pdserve.serving.metrics import ServerMetrics

    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=60.0, dp_size=2)
        for rank in range(2):
            reg = registration(rank, epoch=13, load_balance_method="round_robin")
            registry.register_worker(reg, now=time.monotonic())
        server = await start_bootstrap_server(registry, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                peers = PeerDirectory(session, 30.0, DisaggMetrics(ServerMetrics("decode", "m")))
                assert (await peers.server_info(server.url)).epoch == 13
                registry.register_room(5, 1, now=time.monotonic())
                assert await peers.query_rank(server.url, 5, epoch=13) == 1
                with pytest.raises(StalePrefillInfo, match=r"restarted \(epoch 11 -> 13\)"):
                    await asyncio.wait_for(peers.query_rank(server.url, 6, epoch=11), 10.0)
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_an_error_in_the_rank_query_loop_fails_its_rooms_at_once():
    """A bug in the loop that asks for ranks (here: in its metrics) ended the loop and left
    every room it was asking about waiting for its deadline; they now fail at once, 500."""
    from pdserve.disagg.metrics import DisaggMetrics
    from pdserve.disagg.peer_info import PeerDirectory
    from pdserve.serving.hooks import RequestError
    from pdserve.serving.metrics import ServerMetrics

    class BrokenMetrics(DisaggMetrics):
        def query_round_trip(self, num_rooms: int) -> None:
            raise RuntimeError("a bug")

    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=60.0, dp_size=2)
        for rank in range(2):
            registry.register_worker(registration(rank), now=time.monotonic())
        server = await start_bootstrap_server(registry, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                peers = PeerDirectory(session, 30.0, BrokenMetrics(ServerMetrics("decode", "m")))
                info = await peers.server_info(server.url)
                registry.register_room(5, 1, now=time.monotonic())
                with pytest.raises(RequestError) as failed:
                    await asyncio.wait_for(peers.query_rank(server.url, 5, info.epoch), 10.0)
                assert failed.value.status == 500 and "a bug" in failed.value.message
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_connection_that_never_finishes_its_head_is_closed_after_the_idle_timeout():
    """aiohttp's default kept it (a file descriptor) for an hour."""

    async def scenario() -> None:
        registry = BootstrapRegistry(room_ttl_s=60.0)
        server = await start_bootstrap_server(registry, "127.0.0.1", 0, idle_timeout_s=0.5)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never a whole head
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
        finally:
            await server.stop()

    asyncio.run(scenario())
