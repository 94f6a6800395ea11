"""What a prefill + decode pair's /metrics count, checked against what they served. The
tests share one pair (each leaves it running and idle) and read counters before and after."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import requests

from tests.disagg.pd_driver import leg_body, metric_value, pd_generate, rooms_in_flight, wait_idle
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

KV_BYTES = "pdserve_kv_transfer_bytes_total"
REQUESTS = "pdserve_requests_total"
ROOMS = "pdserve_num_disagg_rooms"


def _open_leg(url: str, body: dict) -> socket.socket:
    """POST /generate on a socket of its own, not read: the caller hangs up by closing it."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.fixture(scope="module")
def pair(pd_pairs):
    return pd_pairs.get()


def test_kv_sent_for_a_prefill_leg_whose_client_left_counts_on_both_sides(pair):
    """Prefill's workers send a room's KV on their own; their report reaches the front end
    after the leg's client left when the router aborts it as decode streams (a client
    disconnect): prefill's KV bytes then fell short of what decode received."""
    prefill, decode = pair
    port = prefill.bootstrap_port
    ids = list(range(3, 40))
    received_before = metric_value(decode.url, KV_BYTES)
    sent_before = metric_value(prefill.url, KV_BYTES)
    warm = pd_generate(prefill.url, decode.url, leg_body(port, 1, ids, "warm"), bootstrap_port=port)
    assert warm.decode.ok, warm.decode.error  # decode knows prefill's worker from now on
    # The warm room may still show in /get_load (room counts are reported with the next
    # load report): counted as the new leg's, the front end was stopped before it passed
    # the leg on, and decode waited 30 s for a request prefill never got.
    wait_idle([prefill.url])
    leg = _open_leg(prefill.url, leg_body(port, 2, ids, "p"))
    with leg:
        wait_until(lambda: rooms_in_flight(prefill.url) == 1, 30, "prefill's room")
        os.kill(prefill.server.pid, signal.SIGSTOP)  # the front end only: its workers run on
        try:
            leg.close()  # seen, with the worker's report, once the front end runs again
            answer = requests.post(decode.url + "/generate", json=leg_body(port, 2, ids, "d"))
            assert answer.ok, answer.text
        finally:
            os.kill(prefill.server.pid, signal.SIGCONT)
    wait_idle([prefill.url, decode.url])
    received = metric_value(decode.url, KV_BYTES) - received_before
    both = [warm.decode.body, answer.json()]
    assert received == sum(leg["meta_info"]["kv_transfer_bytes"] for leg in both) > 0
    sent = lambda: metric_value(prefill.url, KV_BYTES) - sent_before  # noqa: E731
    wait_until(lambda: sent() == received, 10, "prefill's count")


def test_a_decode_leg_whose_client_left_while_finding_prefill_counts_as_cancelled(pair):
    """A decode leg waits for prefill's bootstrap server before its worker has it (rank and
    KV endpoint); a client gone meanwhile (the router aborting it when the prefill leg
    failed) ended the request in no outcome of pdserve_requests_total."""
    decode = pair[1]
    requests_before = metric_value(decode.url, REQUESTS)
    cancelled = {"status": "cancelled"}
    cancelled_before = metric_value(decode.url, REQUESTS, cancelled)
    with socket.create_server(("127.0.0.1", 0)) as bootstrap:  # accepts, never answers
        port = bootstrap.getsockname()[1]
        with _open_leg(decode.url, leg_body(port, 3, list(range(3, 40)), "d")):
            bootstrap.settimeout(30)
            held, _ = bootstrap.accept()  # decode asks prefill's bootstrap server
        with held:
            wait_until(
                lambda: metric_value(decode.url, REQUESTS, cancelled) == cancelled_before + 1,
                10,
                "the cancelled request",
            )
    assert metric_value(decode.url, REQUESTS) == requests_before + 1


def test_rooms_in_flight_show_in_metrics_and_end_at_zero(pair):
    """/get_load's num_disagg_rooms had no /metrics gauge: a scrape could not see rooms
    held (a prefill leg waiting for decode's page list) or check they end."""
    prefill, decode = pair
    port = prefill.bootstrap_port
    body = leg_body(port, 4, list(range(43, 80)), "p")  # not cached by the tests before
    with _open_leg(prefill.url, body):  # no decode leg yet: the room waits for its page list
        rooms = {"dp_rank": "0"}
        wait_until(lambda: metric_value(prefill.url, ROOMS, rooms) == 1, 30, "the room")
        assert requests.post(decode.url + "/generate", json=dict(body, rid="d")).ok
    wait_idle([prefill.url, decode.url])
    for url in (prefill.url, decode.url):
        wait_until(lambda u=url: metric_value(u, ROOMS, rooms) == 0, 10, "no rooms")
