"""Faults on the PD path: a dead prefill worker, a room only decode ever sees, duplicate
rooms, garbage on a KV port, aborts from either side, incompatible servers. Every request
ends with a reason, and every page comes back. Tests that leave both servers running share
a module's pair (rooms never repeat); tests that kill or misconfigure one start their own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
import zmq

from pdserve.disagg.messages import PROTOCOL_VERSION
from tests.disagg.conftest import BACKENDS, Prefill, backend_args
from tests.disagg.pd_driver import (
    metric_value,
    pages_in_use,
    pd_generate,
    pd_generate_async,
    random_room,
    rooms_in_flight,
    run_many,
    wait_idle,
)
from tests.helpers import ServerProcess, wait_until

BODY = {
    "input_ids": list(range(10, 60)),
    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
}
KV_WAIT_S = 2.0  # long enough to send a duplicate while the first request waits
HEARTBEAT = ["--heartbeat-interval-s", "0.2", "--heartbeat-timeout-s", "1.0"]


@pytest.fixture(scope="module")
def pairs(pd_module) -> Callable[[str], tuple[Prefill, ServerProcess]]:
    """Prefill + decode pairs with the default deadlines, one per transfer backend, each
    started when a test first asks for it."""
    started: dict[str, tuple[Prefill, ServerProcess]] = {}

    def pair_for(backend: str) -> tuple[Prefill, ServerProcess]:
        if backend not in started:
            args = backend_args(backend)
            started[backend] = (pd_module.prefill(1, args), pd_module.decode(1, args))
        return started[backend]

    return pair_for


@pytest.fixture(scope="module")
def pair(pairs) -> tuple[Prefill, ServerProcess]:
    return pairs("zmq")


@pytest.fixture(scope="module")
def short_kv_wait_pair(pd_module, pair) -> tuple[Prefill, ServerProcess]:
    """The zmq pair's prefill (rooms never repeat) and a decode that gives up waiting for
    KV after KV_WAIT_S."""
    return pair[0], pd_module.decode(1, ["--kv-wait-timeout-s", str(KV_WAIT_S)])


@pytest.fixture(scope="module")
def small_decode_pair(pd_module, pair) -> tuple[Prefill, ServerProcess]:
    """The zmq pair's prefill and a decode whose pool holds only 64 tokens (4 pages)."""
    return pair[0], pd_module.decode(1, ["--max-total-tokens", "64"])


@pytest.fixture(scope="module")
def heartbeat_decode(pd_module) -> Callable[[str], ServerProcess]:
    """A decode per transfer backend that declares a silent prefill worker dead within a
    second, for the tests that kill or freeze their own prefill's worker (decode survives
    them: each waits until its pages are freed)."""
    started: dict[str, ServerProcess] = {}

    def decode_for(backend: str) -> ServerProcess:
        if backend not in started:
            started[backend] = pd_module.decode(1, [*HEARTBEAT, *backend_args(backend)])
        assert started[backend].alive()
        return started[backend]

    return decode_for


@pytest.fixture(scope="module")
def page8_prefill(pd_module) -> Prefill:
    """A prefill with 8-token pages (no decode here has them) and a 1.5 s deadline for
    decode's page list: for the tests of a room decode never takes."""
    return pd_module.prefill(1, ["--page-size", "8", "--bootstrap-timeout-s", "1.5"])


def _leg(bootstrap_port: int, room: int, body: dict = BODY, **extra) -> dict:
    """One leg's body, as a router would send it to either server."""
    return dict(
        body,
        bootstrap_host="127.0.0.1",
        bootstrap_port=bootstrap_port,
        bootstrap_room=room,
        **extra,
    )


def _decode_only(
    decode_url: str, prefill_bootstrap_port: int, room: int, timeout_s: float = 30, **extra
) -> requests.Response:
    body = _leg(prefill_bootstrap_port, room, **extra)
    return requests.post(decode_url + "/generate", json=body, timeout=timeout_s)


def _post_async(url: str, body: dict) -> concurrent.futures.Future:
    """Send one request from a thread; the future gives the response."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(requests.post, url + "/generate", json=body, timeout=60)
    pool.shutdown(wait=False)
    return future


def _failure_recorded(prefill: Prefill, leg: dict) -> bool:
    """Whether prefill's bootstrap server holds a failure for the leg's room."""
    url = f"http://127.0.0.1:{prefill.bootstrap_port}/query_dp_ranks"
    room = leg["bootstrap_room"]
    answer = requests.post(url, json={"bootstrap_rooms": [room]}, timeout=5).json()
    return isinstance(answer.get(str(room)), dict)


def test_room_sent_only_to_decode_fails_at_its_deadline(short_kv_wait_pair):
    prefill, decode = short_kv_wait_pair
    start = time.monotonic()
    resp = _decode_only(decode.url, prefill.bootstrap_port, room=12345)
    elapsed_s = time.monotonic() - start
    assert resp.status_code == 504, resp.text
    message = resp.json()["error"]["message"]
    assert f"timed out after {KV_WAIT_S:g}s waiting for the KV of room 12345" in message
    assert KV_WAIT_S - 0.1 < elapsed_s < KV_WAIT_S + 8.5
    wait_idle([prefill.url, decode.url])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_prefill_worker_fails_its_rooms_within_the_heartbeat_window(
    pd, heartbeat_decode, backend
):
    prefill = pd.prefill(1, backend_args(backend))
    decode = heartbeat_decode(backend)
    pending = [_post_async(decode.url, _leg(prefill.bootstrap_port, room)) for room in (11, 22, 33)]
    wait_until(lambda: pages_in_use(decode.url) > 0, 20, "decode to reserve pages")
    worker_pid = requests.get(prefill.url + "/server_info", timeout=5).json()["worker_pids"][0]
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    for future in pending:
        resp = future.result(timeout=30)
        assert resp.status_code == 503, resp.text
        assert "lost the connection to prefill worker" in resp.json()["error"]["message"]
    assert time.monotonic() - killed_at < 5.0
    wait_until(lambda: pages_in_use(decode.url) == 0, 5, "decode pages to be freed")


def test_frozen_prefill_worker_fails_its_rooms_by_heartbeat(pd, heartbeat_decode):
    """SIGSTOP keeps the TCP connection open: only the ZeroMQ heartbeat can tell."""
    prefill = pd.prefill(1)
    decode = heartbeat_decode("zmq")
    worker_pid = requests.get(prefill.url + "/server_info", timeout=5).json()["worker_pids"][0]
    # Connect and handshake first with one full request, so the connection exists.
    assert pd_generate(
        prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port
    ).decode.ok
    pending = _post_async(decode.url, _leg(prefill.bootstrap_port, 5))
    wait_until(lambda: pages_in_use(decode.url) > 0, 20, "decode to reserve pages")
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        resp = pending.result(timeout=30)
        assert resp.status_code == 503, resp.text
        assert "heartbeat" in resp.json()["error"]["message"]
        assert time.monotonic() - stopped_at < 6.0
        wait_until(lambda: pages_in_use(decode.url) == 0, 5, "decode pages to be freed")
    finally:
        os.kill(worker_pid, signal.SIGCONT)


def test_duplicate_room_is_rejected_on_both_servers(short_kv_wait_pair):
    prefill, decode = short_kv_wait_pair
    first = _post_async(decode.url, _leg(prefill.bootstrap_port, 7))
    wait_until(lambda: pages_in_use(decode.url) > 0, 20, "the first request to reach decode")
    dup = _decode_only(decode.url, prefill.bootstrap_port, room=7)
    assert dup.status_code == 400 and "already in flight" in dup.json()["error"]["message"]
    assert first.result(timeout=30).status_code == 504
    wait_idle([prefill.url, decode.url])


def test_missing_room_is_a_clear_400(pair):
    prefill, decode = pair
    for url in (prefill.url, decode.url):
        resp = requests.post(url + "/generate", json=BODY, timeout=30)
        assert resp.status_code == 400
        assert "bootstrap_room" in resp.json()["error"]["message"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_on_a_kv_port_is_dropped_and_service_continues(pairs, backend):
    prefill, decode = pairs(backend)
    endpoint = requests.get(
        f"http://127.0.0.1:{prefill.bootstrap_port}/route?prefill_dp_rank=0", timeout=5
    ).json()["kv_endpoint"]
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(os.urandom(4096))
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        for frames in ([b"\xff\x00garbage"], [b"\x81\xa4type\xa8PageList"], [os.urandom(64)] * 3):
            dealer.send_multipart(frames)
        dealer.close()
    finally:
        ctx.term()
    result = pd_generate(prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port)
    assert result.decode.ok, result.decode.error
    wait_idle([prefill.url, decode.url])


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_on_decode_frees_pages_on_both_sides(pairs, backend):
    prefill, decode = pairs(backend)
    pending = _post_async(decode.url, _leg(prefill.bootstrap_port, 99, rid="abort-me"))
    wait_until(lambda: pages_in_use(decode.url) > 0, 20, "decode to reserve pages")
    resp = requests.post(decode.url + "/abort_request", json={"rid": "abort-me"}, timeout=10)
    assert resp.status_code == 200
    answer = pending.result(timeout=30)
    assert (
        answer.status_code != 200 or answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
    )
    wait_idle([prefill.url, decode.url])


def test_abort_on_prefill_fails_the_decode_leg(pair):
    prefill, decode = pair
    long_body = dict(BODY, sampling_params={"max_new_tokens": 4, "temperature": 0})
    room = random.randrange(2**63)
    # The prefill leg alone first: it computes, then waits for decode's page list.
    pending = _post_async(
        prefill.url, _leg(prefill.bootstrap_port, room, body=long_body, rid="p-abort")
    )
    wait_until(lambda: pages_in_use(prefill.url) > 0, 20, "prefill to hold the pages")
    requests.post(prefill.url + "/abort_request", json={"rid": "p-abort"}, timeout=10)
    pending.result(timeout=30)
    resp = _decode_only(decode.url, prefill.bootstrap_port, room=room)
    assert resp.status_code >= 400 and "abort" in resp.json()["error"]["message"]
    wait_idle([prefill.url, decode.url])


def test_incompatible_page_size_fails_with_both_values(page8_prefill, pair):
    """The shared decode has the default page size, 16."""
    decode = pair[1]
    assert requests.get(decode.url + "/server_info", timeout=10).json()["page_size"] == 16
    prefill = page8_prefill
    result = pd_generate(
        prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    assert not result.decode.ok
    assert (
        "page_size" in result.decode.error
        and "8" in result.decode.error
        and "16" in result.decode.error
    )
    wait_idle([decode.url])


@contextlib.contextmanager
def older_bootstrap(bootstrap_port: int) -> Iterator[int]:
    """A bootstrap server on a free port of its own that answers GET /route as the real one
    at `bootstrap_port` does, but for a prefill server one protocol version older (a rolling
    upgrade's half-way state); every other request is a 404. Yields its port."""
    real = f"http://127.0.0.1:{bootstrap_port}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/route":
                return self.send_error(404)
            answer = requests.get(real + self.path, timeout=10).json()
            answer["protocol_version"] = PROTOCOL_VERSION - 1
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_prefill_of_another_protocol_version_is_refused_at_once_naming_both(pair):
    """Its worker registrations would not parse here: decode asked for them again until the
    bootstrap deadline (30 s), then failed with no word of the versions."""
    prefill, decode = pair
    with older_bootstrap(prefill.bootstrap_port) as port:
        resp = _decode_only(decode.url, port, room=random_room())
    error = resp.json()["error"]
    assert resp.status_code == 500, resp.text
    expected = f"protocol_version: prefill={PROTOCOL_VERSION - 1} decode={PROTOCOL_VERSION}"
    assert expected in error["message"] and "origin" not in error, resp.text
    wait_idle([decode.url])


def test_many_concurrent_rooms_all_complete(pd):
    prefill = pd.prefill(2)
    decode = pd.decode(2)
    results = run_many(
        lambda s: [
            pd_generate_async(
                s,
                prefill.url,
                decode.url,
                dict(BODY, input_ids=list(range(5, 5 + n))),
                bootstrap_port=prefill.bootstrap_port,
            )
            for n in range(1, 41)
        ]
    )
    assert all(r.prefill.ok and r.decode.ok for r in results), [
        r.decode.error for r in results if not r.decode.ok
    ]
    wait_idle([prefill.url, decode.url])


def test_room_sent_only_to_prefill_fails_at_its_deadline(page8_prefill):
    prefill = page8_prefill
    start = time.monotonic()
    resp = requests.post(
        prefill.url + "/generate",
        json=dict(
            BODY,
            bootstrap_host="127.0.0.1",
            bootstrap_port=prefill.bootstrap_port,
            bootstrap_room=4242,
        ),
        timeout=30,
    )
    assert resp.status_code == 504, resp.text
    assert "waiting for decode's page list for room 4242" in resp.json()["error"]["message"]
    assert time.monotonic() - start < 10
    wait_idle([prefill.url])


def test_request_too_big_for_decode_fails_both_legs_with_the_limit(small_decode_pair):
    prefill, decode = small_decode_pair
    body = dict(BODY, input_ids=list(range(3, 103)))  # 100 prompt tokens > 64-token pool
    result = pd_generate(
        prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    # Both legs answer decode's status and reason (not a 500 for the prefill leg).
    for leg in (result.decode, result.prefill):
        assert leg.status == 400, leg.body
        assert "KV pages" in leg.error
    assert result.prefill.elapsed_s < 10
    # Prompt logprobs only (no KV moves, decode answers at once) are refused all the same,
    # as a colocated server with decode's pool refuses them: decode answered 200 and no
    # tokens. Its prefill leg, with the default pool, may answer before it hears of that.
    zero = dict(body, sampling_params={"max_new_tokens": 0})
    result = pd_generate(
        prefill.url, decode.url, zero, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    assert result.decode.status == 400, result.decode.body
    assert "KV pages" in result.decode.error
    assert result.prefill.status in (200, 400) and result.prefill.elapsed_s < 10
    wait_idle([prefill.url, decode.url])


def test_the_prefill_leg_of_a_room_decode_refused_carries_origin_decode(small_decode_pair):
    """Decode refuses a prompt too large for its pool and tells prefill, whose leg ends with
    that failure marked `origin: decode`: parked in its worker for the page list (the worker
    hears of it), or come after the failure was recorded (the front end answers). It had no
    origin: a router that got prefill's answer first took the fault for prefill's own."""
    prefill, decode = small_decode_pair
    body = dict(BODY, input_ids=list(range(3, 103)))  # 100 prompt tokens > 64-token pool
    leg = _leg(prefill.bootstrap_port, random_room(), body)
    parked = _post_async(prefill.url, leg)
    wait_until(lambda: rooms_in_flight(prefill.url) == 1, 10, "prefill's leg to park")
    refused = requests.post(decode.url + "/generate", json=leg, timeout=30)
    assert refused.status_code == 400 and "origin" not in refused.json()["error"], refused.text
    late = _leg(prefill.bootstrap_port, random_room(), body)
    assert requests.post(decode.url + "/generate", json=late, timeout=30).status_code == 400
    wait_until(lambda: _failure_recorded(prefill, late), 10, "decode's report")
    for answer in (
        parked.result(timeout=30),
        requests.post(prefill.url + "/generate", json=late, timeout=30),
    ):
        error = answer.json()["error"]
        assert answer.status_code == 400 and error.get("origin") == "decode", answer.text
        assert error["message"].startswith("decode failed the room: prompt + max_new_tokens")
    wait_idle([prefill.url, decode.url])


def test_a_batch_item_too_big_for_decode_fails_every_room_of_the_batch_with_its_reason(
    small_decode_pair,
):
    """The items of a batch that one item failed end with that item's error, on both legs:
    they were cancelled, and their prefill legs heard 'decode failed the room: cancelled'
    (499) and answered the client that. The decode leg goes first and its failures are
    recorded before the prefill leg comes, so prefill reads the first item's failure first."""
    prefill, decode = small_decode_pair
    recorded = "pdserve_bootstrap_failures_recorded_total"
    recorded_before = metric_value(prefill.url, recorded)  # the pair is shared
    body = dict(BODY, input_ids=[list(range(3, 18)), list(range(3, 103))])  # fits; 100 > pool
    leg = _leg(prefill.bootstrap_port, [random.randrange(2**63) for _ in range(2)], body)
    answer = requests.post(decode.url + "/generate", json=leg, timeout=30)
    assert answer.status_code == 400 and "KV pages" in answer.text, answer.text
    wait_until(
        lambda: metric_value(prefill.url, recorded) >= recorded_before + 2,
        10,
        "both rooms' failures",
    )
    answer = requests.post(prefill.url + "/generate", json=leg, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "decode failed the room: prompt + max_new_tokens" in answer.text
    assert "KV pages" in answer.text
    wait_idle([prefill.url, decode.url])


def test_zero_new_tokens_answers_both_legs_without_moving_kv(pair):
    prefill, decode = pair
    body = dict(
        BODY, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )
    result = pd_generate(
        prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    assert result.prefill.ok and result.decode.ok, (result.prefill.body, result.decode.body)
    assert result.decode.body["output_ids"] == [] and result.decode.elapsed_s < 10
    assert len(result.prefill.body["meta_info"]["input_token_logprobs"]) == len(BODY["input_ids"])
    wait_idle([prefill.url, decode.url])


def test_mismatched_transfer_backends_fail_at_the_handshake(pd, pair):
    """A prefill of its own; the shared decode runs zmq (`pairs`)."""
    prefill_backend = "fake"
    prefill = pd.prefill(1, backend_args(prefill_backend))
    decode = pair[1]
    result = pd_generate(
        prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    assert result.decode.status == 500
    want = f"transfer backend mismatch: decode='zmq' prefill='{prefill_backend}'"
    assert want in result.decode.error
    assert result.prefill.elapsed_s < 10
    wait_idle([prefill.url, decode.url])
