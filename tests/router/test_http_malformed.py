"""Malformed and smuggling-shaped requests against a real `pdserve router` on loopback: each
gets its error status and a closed connection, nothing reaches a worker, and the router goes
on serving well-formed requests."""

from __future__ import annotations

import json
import socket

import pytest

from tests.router.conftest import router_args, start_router

pytestmark = pytest.mark.timeout(120)

GOOD = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
GOOD_LAST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HIDDEN = b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{"text":"hi"}'

# Shapes that let a front proxy and the router disagree on where a request ends.
SMUGGLING = {
    "two different Content-Length": (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
        b"Content-Length: 0\r\n\r\n" + b'{"text":"hi"}'
    ),
    "space before the colon": (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n" + HIDDEN
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN
    ),
    "Transfer-Encoding with Content-Length": (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\n" + HIDDEN
    ),
}

MALFORMED = {
    "not HTTP": b"NONSENSE\r\n\r\n",
    "unknown version word": b"GET /health HTTP/1.x\r\n\r\n",
    "bare LF line ends": b"GET /health HTTP/1.1\nHost: x\n\n",
    "space in the method": b"GE T /health HTTP/1.1\r\n\r\n",
    "control byte in the target": b"GET /hea\x01lth HTTP/1.1\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
    "NUL in a header value": b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "obsolete line folding": b"GET /health HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
    "Content-Length not a number": b"POST /generate HTTP/1.1\r\nContent-Length: ab\r\n\r\n",
    "negative Content-Length": b"POST /generate HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "signed Content-Length": b"POST /generate HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
    "Content-Length list": b"POST /generate HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
    "chunked not last": (
        b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    "unknown coding alone": b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n{}",
    "bad chunk size": b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk longer than its size": (
        b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"
    ),
}


def exchange(router, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `data`, then read until the router closes the connection."""
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # a timeout raises: the router did not close
            received += chunk
    return received


def answers(raw: bytes) -> list[tuple[int, bytes, dict]]:
    """(status, head, JSON body) of each Content-Length answer in `raw`."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        out.append((int(head.split(b" ")[1]), head, json.loads(rest[:length])))
        raw = rest[length:]
    return out


@pytest.fixture(scope="module")
def router(stubs):
    args = router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url])
    with start_router(args) as proc:
        yield proc


def assert_refused_then_served(router, data: bytes, status: int = 400) -> None:
    (answer,) = answers(exchange(router, data))
    assert answer[0] == status and b"Connection: close" in answer[1], answer
    assert answer[2]["error"]["code"] == status
    assert answer[2]["error"]["message"].startswith("bad request")
    assert [status for status, _, _ in answers(exchange(router, GOOD_LAST))] == [200]


@pytest.mark.parametrize("shape", SMUGGLING)
def test_smuggling_shape_gets_400_and_a_close_and_reaches_no_worker(shape, router, stubs):
    assert_refused_then_served(router, SMUGGLING[shape])
    assert stubs["d1"].log()["bodies"] == [] and stubs["p1"].log()["bodies"] == []


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_gets_400_and_a_close(case, router):
    assert_refused_then_served(router, MALFORMED[case])


def test_other_refusals_have_their_own_status(router):
    assert_refused_then_served(router, b"GET /health HTTP/2.0\r\n\r\n", 505)
    assert_refused_then_served(router, b"GET /health\r\n\r\n", 505)  # HTTP/0.9
    chunked_gzip = b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    assert_refused_then_served(router, chunked_gzip, 501)


def test_requests_before_a_bad_one_on_the_connection_are_answered_first(router):
    smuggled = SMUGGLING["two different Content-Length"]
    raw = exchange(router, GOOD + GOOD + smuggled + GOOD)
    assert [status for status, _, _ in answers(raw)] == [200, 200, 400]
