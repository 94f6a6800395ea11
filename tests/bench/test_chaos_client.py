"""The chaos soak's client side on real sockets: a streamed answer is read to its end and
judged like a whole one, a stream the router ends with an error event alone is a failure
with its reason (not a request lost), a stream cut with no error is lost, and a server's
idle load counts requests as well as pages and rooms."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdserve.bench.chaos_cluster import http, http_stream, live_load, plan_nodes, reference_node
from pdserve.bench.chaos_core import FAILED, LOST, OK, judge
from pdserve.cluster import ClusterConfig
from tests.helpers import ipv6_loopback_missing, wait_until

BODY = {"input_ids": [5, 9, 12, 40], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


def test_a_streamed_answer_is_judged_like_a_whole_one(tiny_server):
    status, whole = http("POST", tiny_server.url + "/generate", BODY, 60)
    assert status == 200
    expected = whole["output_ids"]
    status, last = http_stream(tiny_server.url + "/generate", BODY, 60)
    assert judge(status, last, expected) == (OK, "")
    # The worker reports its load just after sending the last output: the client may ask
    # in between.
    idle = {"pages": 0, "rooms": 0, "reqs": 0}
    wait_until(lambda: live_load(tiny_server.url) == idle, 10, "the server to be idle")


def _sse_server(events: list[bytes]) -> ThreadingHTTPServer:
    """A real HTTP server answering every POST with a 200 event stream of `events`, then
    closing the connection (as the router does when decode's connection fails)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in events:
                self.wfile.write(event)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def sse_url() -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def start(events: list[bytes]) -> str:
        server = _sse_server(events)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/generate"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_stream_ended_by_an_error_event_alone_is_a_failure_with_its_reason(sse_url):
    url = sse_url([
        b'data: {"output_ids": [1]}\n\n',
        b'data: {"error": {"message": "decode server failed: connection lost", "code": 502}}\n\n',
    ])  # fmt: skip
    status, last = http_stream(url, BODY, 10)
    assert judge(status, last, [1, 2]) == (
        FAILED, "200 stream error: decode server failed: connection lost"
    )  # fmt: skip


def test_a_stream_cut_without_an_error_or_done_is_lost(sse_url):
    url = sse_url([b'data: {"output_ids": [1]}\n\n'])
    status, last = http_stream(url, BODY, 10)
    assert judge(status, last, [1, 2])[0] == LOST
    done = sse_url([b'data: {"output_ids": [1, 2]}\n\n', b"data: [DONE]\n\n"])
    assert judge(*http_stream(done, BODY, 10), [1, 2]) == (OK, "")


def test_the_soak_cluster_brackets_an_ipv6_host_in_its_urls():
    if ipv6_loopback_missing() is not None:
        pytest.skip(str(ipv6_loopback_missing()))
    config = ClusterConfig(host="::1")
    nodes = [*plan_nodes(config, 1, 1, []), reference_node(config)]
    urls = [n.url for n in nodes] + [p for n in nodes for p in n.ready_paths if "//" in p]
    assert all(u.startswith("http://[::1]:") for u in urls), urls
    router = nodes[-2].argv
    peers = [router[i + 1] for i, a in enumerate(router) if a in ("--prefill", "--decode")]
    assert len(peers) == 2 and all(p.startswith("http://[::1]:") for p in peers), router
