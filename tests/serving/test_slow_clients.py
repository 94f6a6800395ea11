"""Clients that misbehave on the server's HTTP port, over real sockets: one that never
finishes its request head, and ones that never read their answer. Each is cut off at its
deadline while others are served."""

from __future__ import annotations

import errno
import json
import socket

import pytest
import requests

from tests.conftest import TINY_ARGS
from tests.helpers import launch_server, wait_until

DEADLINE_ARGS = ["--idle-timeout-s", "1", "--send-timeout-s", "1"]
# An answer of about 6 MB: more than the sockets between the server and a client that reads
# nothing hold (4 KiB on the client, at most 4 MiB of the server's send buffer).
BIG_ANSWER = {
    "model": "tiny-random",
    "prompt": "hello " * 3000,
    "max_tokens": 1,
    "n": 4,
    "echo": True,
    "logprobs": 20,
}


@pytest.fixture(scope="module")
def server():
    with launch_server([*TINY_ARGS, *DEADLINE_ARGS]) as srv:
        yield srv


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect((host, int(port)))
    return sock


def post(path: str, body: dict, request_id: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"X-Request-Id: {request_id}\r\n" if request_id else ""
    return head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data


def reset_by_server(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


def test_a_connection_that_never_finishes_its_head_is_closed_after_the_idle_timeout(
    server,
) -> None:
    """aiohttp's default kept it (a file descriptor) for an hour."""
    with connect(server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: never whole
        sock.settimeout(30)
        assert sock.recv(4096) == b""
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_reads_none_of_its_answer_is_hung_up_on(server, stream) -> None:
    """It stays connected and reads nothing: the server waited for it for good, holding
    its handler, its connection and what was left of its answer. The log line names the
    request by its X-Request-Id."""
    request_id = f"slow-reader-{stream}"
    with connect(server.url) as sock:
        sock.sendall(post("/v1/completions", {**BIG_ANSWER, "stream": stream}, request_id))
        wait_until(lambda: reset_by_server(sock), 60, "the server to hang up on the client")
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    line = "hung up on the client: it read none of its answer for 1 s"
    assert f"{line} [request_id={request_id}]" in server.output()
