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


def test_each_leg_counts_what_docs_disaggregation_says(pair):
    """The per-leg accounting of docs/disaggregation.md (Metrics), against the answers: both
    legs count the request and its prompt; prefill one generated token (the first, sampled
    there), decode all of them; both count prefill's cached tokens, decode's own held ones go
    to its prefix cache and skipped-token counters; ITL only on decode."""
    prefill, decode = pair
    port = prefill.bootstrap_port
    names = [
        REQUESTS,
        "pdserve_prompt_tokens_total",
        "pdserve_generation_tokens_total",
        "pdserve_cached_tokens_total",
        "pdserve_time_to_first_token_seconds_count",
        "pdserve_inter_token_latency_seconds_count",
        "pdserve_e2e_request_latency_seconds_count",
        "pdserve_prefix_cache_hit_tokens_total",
        "pdserve_kv_transfer_skipped_tokens_total",
    ]

    def snapshot(url: str) -> dict[str, float]:
        """The counters once the workers' reports caught up: the prefix-cache counts come in
        load reports, and a leg can end before the report carrying its own (once 0 against
        48 in CI); a flush's answer comes after a fresh report from every worker."""
        assert requests.post(url + "/flush_cache", timeout=30).status_code == 200
        return {n: metric_value(url, n) for n in names}

    wait_idle([prefill.url, decode.url])
    before = {url: snapshot(url) for url in (prefill.url, decode.url)}
    ids = list(range(5, 5 + 3 * 16 + 7))  # three whole pages and a part: the second hits
    answers = []
    for n in range(2):
        body = leg_body(port, 7100 + n, ids, f"legs-{n}", new_tokens=5)
        result = pd_generate(prefill.url, decode.url, body, bootstrap_port=port)
        assert result.prefill.ok and result.decode.ok, (result.prefill.body, result.decode.body)
        answers.append(result.decode.body["meta_info"])
    wait_idle([prefill.url, decode.url])
    grew = {
        url: {n: v - before[url][n] for n, v in snapshot(url).items()}
        for url in (prefill.url, decode.url)
    }
    cached = sum(a["cached_tokens"] for a in answers)
    assert cached >= 48  # the second request found the first's three pages on prefill
    both = {REQUESTS: 2, "pdserve_prompt_tokens_total": 2 * len(ids)}
    both |= {"pdserve_cached_tokens_total": cached}
    both |= {
        f"pdserve_{h}_seconds_count": 2 for h in ("time_to_first_token", "e2e_request_latency")
    }
    held = sum(a["decode_cached_tokens"] for a in answers)
    assert held >= 48  # and decode held them: only the rest moved
    assert [a["completion_tokens"] for a in answers] == [5, 5]
    assert grew[prefill.url] == both | {
        "pdserve_generation_tokens_total": 2,
        "pdserve_inter_token_latency_seconds_count": 0,
        "pdserve_prefix_cache_hit_tokens_total": cached,
        "pdserve_kv_transfer_skipped_tokens_total": 0,
    }
    assert grew[decode.url] == both | {
        "pdserve_generation_tokens_total": 10,
        "pdserve_inter_token_latency_seconds_count": 2 * 4,
        "pdserve_prefix_cache_hit_tokens_total": held,
        "pdserve_kv_transfer_skipped_tokens_total": held,
    }
