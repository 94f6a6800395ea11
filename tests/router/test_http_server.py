"""The router's HTTP/1.1 server on loopback, driven by raw sockets (asyncio streams) so that
keep-alive, pipelining, chunked bodies and hang-ups are exactly what the test sends; and its
request parser fed byte by byte."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from pdserve.router.http_client import HttpClient
from pdserve.router.http_parse import MAX_HEAD_BYTES, RequestParser
from pdserve.router.http_server import (
    IDLE_TIMEOUT_S,
    WRITE_STALL_S,
    HttpServer,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(60)
Scenario = Callable[[int], Awaitable[None]]


class Handlers:
    """The test app: echo, a stream, a handler that waits until cancelled, one that fails."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.cut = asyncio.Event()
        self.flooded = False

    async def echo(self, request: Request) -> Response:
        return json_response({"body": request.body.decode(), "query": request.query})

    async def stream(self, request: Request) -> StreamResponse:
        out = StreamResponse(200, {"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(3):
            await out.write(b"data: %d\n\n" % i)
        return out  # the server ends the stream

    async def wait(self, request: Request) -> Response:
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response()

    async def flood(self, request: Request) -> StreamResponse:
        """256 MiB of events, as fast as the client takes them: `cut` if it is cut off."""
        out = StreamResponse(200, {"Content-Type": "text/event-stream"})
        await out.prepare(request)
        try:
            for _ in range(4096):
                await out.write(b"data: " + b"x" * 65536 + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.cut.set()
            raise
        self.flooded = True  # the writes never waited for the client: all of it is buffered
        self.cut.set()
        return out

    async def fail(self, request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def slow(self, request: Request) -> Response:
        await self.release.wait()
        return json_response({"released": True})

    def server(
        self,
        max_body_bytes: int = 1 << 20,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        write_stall_s: float = WRITE_STALL_S,
    ) -> HttpServer:
        routes = {
            "/echo": {"POST": self.echo, "GET": self.echo},
            "/stream": {"POST": self.stream},
            "/flood": {"POST": self.flood},
            "/wait": {"POST": self.wait},
            "/fail": {"GET": self.fail},
            "/slow": {"GET": self.slow},
        }
        return HttpServer(routes, max_body_bytes, idle_timeout_s, write_stall_s=write_stall_s)


def serve(
    handlers: Handlers,
    scenario: Scenario,
    max_body_bytes: int = 1 << 20,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    write_stall_s: float = WRITE_STALL_S,
) -> None:
    async def main() -> None:
        server = handlers.server(max_body_bytes, idle_timeout_s, write_stall_s)
        port = free_port()
        await server.start("127.0.0.1", port)
        try:
            await asyncio.wait_for(scenario(port), 30)
        finally:
            await server.stop(0.0)

    asyncio.run(main())


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\n%bContent-Length: %d\r\n\r\n%b" % (
        path.encode(),
        extra,
        len(body),
        body,
    )


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/echo", b"one"))
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK") and json.loads(body)["body"] == "one"
        writer.write(post("/echo", b"two") + b"GET /echo?a=1&b=x%20y HTTP/1.1\r\n\r\n")
        assert json.loads((await read_answer(reader))[1])["body"] == "two"
        assert json.loads((await read_answer(reader))[1])["query"] == {"a": "1", "b": "x y"}
        writer.close()

    serve(Handlers(), scenario)


def test_head_answers_a_get_routes_head_without_its_body() -> None:
    """RFC 9110 9.3.2 (as the servers' aiohttp does): a load balancer's HEAD /health check
    got 405; the connection then carries the next answer untouched."""

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?a=1 HTTP/1.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head
        get_head, body = await read_answer(reader)  # HEAD's answer had no body before it
        assert get_head.startswith(b"HTTP/1.1 200 OK") and json.loads(body)["query"] == {"a": "1"}
        writer.write(b"HEAD /wait HTTP/1.1\r\nHost: x\r\n\r\n")  # a POST-only route
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 405")
        writer.close()

    serve(Handlers(), scenario)


def test_chunked_body_expect_continue_and_http10() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
        )
        assert json.loads((await read_answer(reader))[1])["body"] == "abcde"
        writer.write(post("/echo", b"later", b"Expect: 100-continue\r\n")[:-5])
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"later")
        assert json.loads((await read_answer(reader))[1])["body"] == "later"
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        head, body = await read_answer(reader)
        assert b"Connection: close" in head and json.loads(body)["body"] == "hi"
        assert await reader.read() == b""  # closed after the answer
        writer.close()

    serve(Handlers(), scenario)


def test_errors_are_json_in_the_router_format() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for request, status in (
            (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
            (b"DELETE /echo HTTP/1.1\r\n\r\n", 405),
            (b"GET /fail HTTP/1.1\r\n\r\n", 500),
        ):
            writer.write(request)
            head, body = await read_answer(reader)
            assert head.startswith(b"HTTP/1.1 %d" % status)
            assert json.loads(body)["error"]["code"] == status
        writer.close()
        for garbage, status in ((b"NONSENSE\r\n\r\n", 400), (post("/echo", b"x" * 100), 413)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            head, body = await read_answer(reader)
            assert head.startswith(b"HTTP/1.1 %d" % status) and b"Connection: close" in head
            assert "bad request" in json.loads(body)["error"]["message"]
            assert await reader.read() == b""
            writer.close()

    serve(Handlers(), scenario, max_body_bytes=50)


def test_stream_is_chunked_ended_and_keeps_the_connection() -> None:
    async def scenario(port: int) -> None:
        client = HttpClient()
        url = f"http://127.0.0.1:{port}"
        for _ in range(2):
            resp = await client.request("POST", url, "/stream", 10.0, b"{}")
            assert resp.header("Transfer-Encoding") == "chunked"
            assert await resp.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            resp.release()
        assert client.pool(url).num_connections == 1
        client.close()

    serve(Handlers(), scenario)


def test_client_hanging_up_cancels_its_handler() -> None:
    handlers = Handlers()

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/wait", b"{}"))
        await handlers.waiting.wait()
        writer.close()
        await handlers.cancelled.wait()

    serve(handlers, scenario)


def test_a_client_that_stops_reading_a_stream_is_cut_off_after_the_write_stall() -> None:
    """It stays connected and reads nothing: the writes wait for it (the router buffered a
    whole stream in memory), and not for good (its handler would have)."""
    handlers = Handlers()

    async def scenario(port: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            sock.sendall(post("/flood", b"{}"))
            await handlers.cut.wait()
            assert not handlers.flooded, "no write waited for the client to read"
        finally:
            sock.close()

    serve(handlers, scenario, write_stall_s=0.5)


def test_request_parser_handles_requests_cut_at_every_byte() -> None:
    stream = (
        b"\r\nPOST /a?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    )
    parser, done = RequestParser(1 << 20), []
    for i in range(len(stream)):
        done += parser.feed(stream[i : i + 1])
    assert [(r.method, r.target, r.body) for r in done] == [
        ("POST", "/a?x=1", b"abc"),
        ("POST", "/b", b"de"),
        ("GET", "/c", b""),
    ]
    assert [(r.http11, r.keep_alive) for r in done] == [
        (True, True),
        (True, True),
        (False, True),
    ]
    parser = RequestParser(1 << 20)
    assert parser.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n") == []
    assert parser.error is not None and parser.error.status == 501


def test_request_parser_refuses_a_head_that_never_ends() -> None:
    parser, piece = RequestParser(1 << 20), b"a" * 1024
    parser.feed(b"GET / HTTP/1.1\r\nX-Long: ")
    for _ in range(2 * MAX_HEAD_BYTES // len(piece)):
        parser.feed(piece)
    assert parser.error is not None and parser.error.status == 431


IDLE_S = 0.3


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/echo", b"one"))
        await read_answer(reader)
        assert await asyncio.wait_for(reader.read(), 10 * IDLE_S) == b""  # closed by the server
        writer.close()

    serve(Handlers(), scenario, idle_timeout_s=IDLE_S)


def test_a_request_that_stalls_half_sent_gets_408_and_a_close() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/echo", b"0123456789")[:-4])  # the body's last bytes never come
        head, body = await asyncio.wait_for(read_answer(reader), 10 * IDLE_S)
        assert head.startswith(b"HTTP/1.1 408") and b"not complete" in body
        assert await reader.read() == b""
        writer.close()

    serve(Handlers(), scenario, idle_timeout_s=IDLE_S)


def test_an_answer_in_progress_is_not_cut_by_the_idle_timeout() -> None:
    handlers = Handlers()

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
        # the handler holds its answer for several idle timeouts, then answers
        await asyncio.sleep(4 * IDLE_S)
        handlers.release.set()
        head, body = await asyncio.wait_for(read_answer(reader), 10 * IDLE_S)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"released": True}
        writer.close()

    serve(handlers, scenario, idle_timeout_s=IDLE_S)


def test_a_path_ending_in_a_star_takes_every_longer_path_under_it() -> None:
    """The router's /v1/models/{model}: a model name may hold slashes."""

    async def listed(request: Request) -> Response:
        return Response()

    async def one(request: Request) -> Response:
        return Response()

    server = HttpServer({"/v1/models": {"GET": listed}, "/v1/models/*": {"GET": one}}, 0)
    assert server.handler("GET", "/v1/models") is listed
    assert server.handler("GET", "/v1/models/org/name") is one
    assert server.handler("HEAD", "/v1/models/m") is one
    for method, path, status in [("GET", "/v1/models/", 404), ("POST", "/v1/models/m", 405)]:
        assert asyncio.run(server.handler(method, path)(None)).status == status
