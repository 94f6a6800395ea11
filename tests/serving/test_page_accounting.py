"""Aborts and client disconnects free every KV page: nothing is left running afterwards."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from tests.helpers import http_json, wait_until

LONG = {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0.0}
CANCELLED = 'pdserve_requests_total{model_name="tiny-random",status="cancelled"}'


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and return it unread, so the test can hang up."""
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read until `marker` arrives (the socket's own timeout bounds each read)."""
    received = b""
    while marker not in received:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before {marker!r}: {received!r}"
        received += chunk
    return received


def load(url: str) -> dict:
    return http_json("GET", f"{url}/get_load")[1][0]


def metric(url: str, name: str) -> float:
    text = http_json("GET", f"{url}/metrics")[1]
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def wait_idle(url: str) -> dict:
    def idle() -> bool:
        current = load(url)
        return (
            current["num_used_pages"] == 0
            and current["num_reqs"] == 0
            and current["num_inflight_reqs"] == 0
        )

    wait_until(idle, 30, "every page free and no request left")
    return load(url)


def test_abort_request_by_rid_ends_the_request_with_finish_reason_abort(tiny_server):
    url = tiny_server.url
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            http_json,
            "POST",
            f"{url}/generate",
            {"text": "long", "rid": "to-abort", "sampling_params": LONG},
        )
        wait_until(lambda: load(url)["num_reqs"] == 1, 30, "the request to run")
        status, out = http_json("POST", f"{url}/abort_request", {"rid": "to-abort"})
        assert status == 200 and out["num_aborted"] == 1
        status, answer = future.result(60)
    assert status == 200
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(answer["output_ids"]) < LONG["max_new_tokens"]
    wait_idle(url)


def test_mixed_load_with_aborts_and_disconnects_frees_every_page(tiny_server):
    url = tiny_server.url
    cancelled_before = metric(url, CANCELLED)
    total_pages = load(url)["num_total_pages"]
    with ThreadPoolExecutor(6) as pool:
        normal = [
            pool.submit(
                http_json,
                "POST",
                f"{url}/generate",
                {"input_ids": [1, 2, 3 + i], "sampling_params": {"max_new_tokens": 20}},
            )
            for i in range(3)
        ]
        aborted = [
            pool.submit(
                http_json,
                "POST",
                f"{url}/generate",
                {"text": f"abort {i}", "rid": f"mixed-{i}", "sampling_params": LONG},
            )
            for i in range(2)
        ]
        # A streaming client that reads one event and hangs up, and one that never reads.
        streaming = raw_post(
            url, "/generate", {"text": "s", "stream": True, "sampling_params": LONG}
        )
        silent = raw_post(
            url, "/v1/completions", {"prompt": "q", "max_tokens": 3000, "ignore_eos": True}
        )
        read_until(streaming, b"data: ")
        wait_until(lambda: load(url)["num_reqs"] >= 3, 30, "the long requests to run")
        assert load(url)["num_used_pages"] > 0
        streaming.close()
        silent.close()
        wait_until(
            lambda: metric(url, CANCELLED) >= cancelled_before + 2,
            30,
            "both disconnected requests to be cancelled",
        )
        http_json("POST", f"{url}/abort_request", {"rid": "mixed-0"})
        http_json("POST", f"{url}/abort_request", {"abort_all": True})
        assert all(f.result(60)[0] == 200 for f in normal)
        for f in aborted:
            status, answer = f.result(60)
            assert status == 200 and answer["meta_info"]["finish_reason"]["type"] == "abort"
    final = wait_idle(url)
    assert final["num_free_pages"] == total_pages
    status, out = http_json(
        "POST", f"{url}/generate", {"text": "after", "sampling_params": {"max_new_tokens": 2}}
    )
    assert status == 200


def test_disconnect_before_the_first_token_still_frees_the_request(tiny_server):
    url = tiny_server.url
    socks = [
        raw_post(url, "/generate", {"input_ids": [7] * 2000, "sampling_params": LONG})
        for _ in range(2)
    ]
    for sock in socks:
        sock.close()
    wait_idle(url)
    assert threading.active_count() >= 1
