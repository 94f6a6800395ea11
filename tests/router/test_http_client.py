"""The router's HTTP/1.1 client against real servers on loopback (aiohttp, and raw asyncio
servers for answers aiohttp would never send), and its parser fed byte by byte."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from pdserve.router.config import WorkerSpec
from pdserve.router.health import CircuitBreaker, HealthState
from pdserve.router.http_client import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    HttpClient,
    ResponseTimeout,
)
from pdserve.router.http_parse import AnswerParser, ParseError
from pdserve.router.legs import classify
from pdserve.router.workers import Worker
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(60)
Scenario = Callable[[str], Awaitable[None]]


def run_with_aiohttp(app: web.Application, scenario: Scenario) -> None:
    """Serve `app` on a free loopback port while `scenario(base_url)` runs."""

    async def main() -> None:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.wait_for(scenario(f"http://127.0.0.1:{port}"), 30)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def run_with_raw(answer: bytes, scenario: Scenario, close_after: bool = True) -> None:
    """A server that answers every request with the bytes `answer` (then closes, or hangs)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close_after:
            writer.close()
        else:
            await reader.read()  # until the client leaves

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await asyncio.wait_for(scenario(f"http://127.0.0.1:{port}"), 30)

    asyncio.run(main())


def a_worker(url: str) -> Worker:
    return Worker(WorkerSpec(url, "decode"), HealthState(1, 1), CircuitBreaker(1, 1, 1.0))


def echo_app(peers: list) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(body=await request.read(), content_type="application/json")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (3 << 20))

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/big", big)
    return app


def test_keep_alive_connection_is_reused_and_bodies_arrive_whole() -> None:
    peers: list = []

    async def scenario(url: str) -> None:
        client = HttpClient()
        for i in range(3):
            resp = await client.request("POST", url, "/echo", 10.0, b'{"i": %d}' % i)
            assert resp.status == 200 and resp.header("Content-Type") == "application/json"
            assert await resp.read() == b'{"i": %d}' % i
            resp.release()
        status, body = await client.get(url, "/big", 10.0)  # above the read high-water mark
        assert status == 200 and body == b"x" * (3 << 20)
        assert client.pool(url).num_connections == 1
        client.close()

    run_with_aiohttp(echo_app(peers), scenario)
    assert len(peers) == 3 and len(set(peers)) == 1


def test_a_released_answer_no_longer_touches_its_reused_connection() -> None:
    async def scenario(url: str) -> None:
        client = HttpClient()
        first = await client.request("POST", url, "/echo", 10.0, b"1")
        await first.read()
        first.release()
        second = await client.request("POST", url, "/echo", 10.0, b"2")
        first.release()
        first.close()  # late calls on the old answer: no effect on the new request
        assert await second.read() == b"2"
        second.release()
        assert client.pool(url).num_connections == 1
        client.close()

    run_with_aiohttp(echo_app([]), scenario)


def test_a_discarded_rest_is_read_and_dropped_then_the_connection_is_reused() -> None:
    """The end of a stream that comes after its last event: nobody waits for it, and the
    connection carries the next request once it has come."""
    gate = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: [DONE]\n\n")
        await gate.wait()  # the end of the body comes later
        await resp.write(b"late bytes nobody reads")
        return resp

    async def scenario(url: str) -> None:
        client = HttpClient()
        resp = await client.request("POST", url, "/stream", 10.0, b"{}")
        assert await resp.read_chunk() == b"data: [DONE]\n\n"
        resp.discard_rest()
        pool = client.pool(url)
        assert not pool._idle and pool.num_connections == 1  # still reading the rest
        gate.set()
        while not pool._idle:  # back in the pool once the end has come
            await asyncio.sleep(0)
        assert await client.get(url, "/big", 10.0) == (200, b"x" * (3 << 20))
        assert pool.num_connections == 1  # the stream's connection carried it
        client.close()

    app = echo_app([])
    app.router.add_post("/stream", stream)
    run_with_aiohttp(app, scenario)


def test_dropping_a_worker_closes_idle_connections_and_lets_answers_in_flight_end() -> None:
    async def scenario(url: str) -> None:
        client = HttpClient()
        idle = await client.request("POST", url, "/echo", 10.0, b"idle")
        busy = await client.request("POST", url, "/echo", 10.0, b"busy")
        await idle.read()
        idle.release()
        pool = client.pool(url)
        assert pool.num_connections == 2
        client.drop(url)
        assert await busy.read() == b"busy"  # the answer in flight is still read whole
        busy.release()
        while pool.num_connections:  # both close: the idle one now, the busy one once read
            await asyncio.sleep(0)
        assert client.pool(url) is not pool
        client.close()

    run_with_aiohttp(echo_app([]), scenario)


def test_chunked_stream_is_read_piece_by_piece_as_it_is_sent() -> None:
    next_event = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b"data: %d\n\n" % i)
            await next_event.wait()
            next_event.clear()
        await resp.write_eof()
        return resp

    async def scenario(url: str) -> None:
        client = HttpClient()
        for _ in range(2):  # the second stream reuses the connection
            resp = await client.request("POST", url, "/stream", 10.0, b"{}")
            assert resp.header("transfer-encoding") == "chunked"
            received = []
            while data := await resp.read_chunk():
                received.append(data)
                next_event.set()  # the server sends the next event only now
            assert received == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
            resp.release()
        assert client.pool(url).num_connections == 1
        client.close()

    app = web.Application()
    app.router.add_post("/stream", stream)
    run_with_aiohttp(app, scenario)


def test_connection_closed_mid_body_is_a_clear_retryable_leg_error() -> None:
    cut_length = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    cut_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    for answer in (cut_length, cut_chunked):

        async def scenario(url: str) -> None:
            client = HttpClient()
            resp = await client.request("POST", url, "/generate", 10.0, b"{}")
            with pytest.raises(ConnectionLost, match="middle of the body") as info:
                await resp.read()
            err = classify(a_worker(url), info.value)
            assert (err.status, err.reason, err.retryable) == (502, "disconnected", True)
            assert f"decode {url}" in str(err) and "connection lost" in str(err)
            assert client.pool(url).num_connections == 0
            client.close()

        run_with_raw(answer, scenario)


def test_connection_closed_before_any_answer_is_a_leg_error() -> None:
    async def scenario(url: str) -> None:
        client = HttpClient()
        with pytest.raises(ConnectionLost, match="before the answer") as info:
            await client.request("POST", url, "/generate", 10.0, b"{}")
        assert classify(a_worker(url), info.value).reason == "disconnected"

    run_with_raw(b"", scenario)


def test_a_request_cancelled_at_any_step_ends_cancelled_and_closes_its_connection() -> None:
    """A leg the router cancels (the client left, the other leg failed) sends nothing more
    and closes its connection, so the worker sees it leave, at whatever step the cancel
    lands. Cancelled just as its connection opened, it once went on to send the request and
    wait for the answer: a prefill room then held its KV pages until the bootstrap deadline
    (the router's abort had come before the request)."""

    async def main() -> None:
        accepted: list[asyncio.Event] = []  # set when that connection's client left

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            left = asyncio.Event()
            accepted.append(left)
            await reader.read()  # never answers: waits for the client to leave
            left.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            for num_steps in range(40):  # every step of connect, send and wait
                client = HttpClient()
                task = asyncio.create_task(client.request("POST", url, "/generate", 30.0, b"{}"))
                for _ in range(num_steps):
                    await asyncio.sleep(0)
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=10.0)
                assert done, f"cancelled after {num_steps} steps, the request went on"
                assert task.cancelled(), f"cancelled after {num_steps} steps: {task!r}"
                for left in accepted:
                    await asyncio.wait_for(left.wait(), 10.0)
                accepted.clear()
                client.close()

    asyncio.run(main())


def test_body_until_close_and_connection_close_are_read_and_not_reused() -> None:
    for answer in (
        b"HTTP/1.0 200 OK\r\n\r\nall of it",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\nall of it",
    ):

        async def scenario(url: str) -> None:
            client = HttpClient()
            status, body = await client.get(url, "/x", 10.0)
            assert (status, body) == (200, b"all of it")
            assert client.pool(url).num_connections == 0 or not client.pool(url)._idle
            client.close()

        run_with_raw(answer, scenario)


def test_garbage_answer_refused_connect_and_deadline_are_classified() -> None:
    async def garbage(url: str) -> None:
        with pytest.raises(BadResponse) as info:
            await HttpClient().get(url, "/x", 10.0)
        assert classify(a_worker(url), info.value).reason == "client_error"

    run_with_raw(b"SSH-2.0-OpenSSH\r\n\r\n", garbage)

    async def silent(url: str) -> None:
        with pytest.raises(ResponseTimeout) as info:
            await HttpClient().get(url, "/x", 0.2)
        err = classify(a_worker(url), info.value)
        assert (err.status, err.reason, err.retryable) == (504, "timeout", False)

    run_with_raw(b"", silent, close_after=False)

    async def refused() -> None:
        url = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(ConnectFailed) as info:
            await HttpClient().get(url, "/x", 10.0)
        err = classify(a_worker(url), info.value)
        assert (err.reason, err.retryable) == ("connect", True) and "cannot connect" in str(err)

    asyncio.run(refused())


def feed_bytewise(answer: bytes) -> tuple[AnswerParser, bytes]:
    parser, body = AnswerParser(), b""
    for i in range(len(answer)):
        body += b"".join(parser.feed(answer[i : i + 1]))
    return parser, body


def test_parser_handles_answers_cut_at_every_byte() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nServer: x\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1A\r\n" + b"y" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n"
    )
    parser, body = feed_bytewise(chunked)
    assert parser.status == 200 and parser.body_done and parser.keep_alive
    assert body == b"hello" + b"y" * 26

    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnah"
    parser, body = feed_bytewise(interim)
    assert parser.status == 404 and parser.body_done and body == b"nah"

    parser, body = feed_bytewise(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert body == b"until the end" and not parser.body_done and not parser.keep_alive
    assert parser.end_of_input() and parser.body_done

    with pytest.raises(ParseError, match="chunk size"):
        feed_bytewise(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_parser_refuses_bytes_past_the_announced_end_for_reuse() -> None:
    parser = AnswerParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA") == [b"ok"]
    assert parser.body_done and not parser.keep_alive
