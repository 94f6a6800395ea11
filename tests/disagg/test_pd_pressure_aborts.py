"""Aborts of decode rooms that hold no pages yet (waiting for free pages, or for another
room's shared prefix to land): the client gets its answer at once, and nothing is left
behind on either server."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
import requests

from tests.disagg.pd_driver import get_load, leg_body, post_async, wait_idle
from tests.helpers import wait_until

PAGE = 16
POOL_PAGES = 8
SHARE_WAIT_S = 60  # far past every wait below: a room that waits for it fails the test


@pytest.fixture(scope="module")
def pair(pd_module):
    prefill = pd_module.prefill(1)
    decode = pd_module.decode(
        1,
        [
            *["--max-total-tokens", str(POOL_PAGES * PAGE), "--kv-wait-timeout-s", "20"],
            *["--kv-share-wait-s", str(SHARE_WAIT_S), "--bootstrap-timeout-s", "200"],
        ],
    )
    return prefill, decode


def _leg(prefill, room: int, ids: list[int], rid: str) -> dict:
    return leg_body(prefill.bootstrap_port, room, ids, rid)


def _post_async(url: str, body: dict) -> concurrent.futures.Future:
    return post_async(url, body, timeout_s=30)


def _rooms(url: str) -> int:
    return sum(rank["num_disagg_rooms"] for rank in get_load(url))


def test_abort_of_a_room_waiting_for_free_pages_answers_the_client(pair):
    prefill, decode = pair
    # Decode leg only: it reserves the whole pool and waits for KV that never comes.
    holder = _post_async(decode.url, _leg(prefill, 7001, list(range(3, 3 + 7 * PAGE + 5)), "hold"))
    wait_until(lambda: get_load(decode.url)[0]["num_used_pages"] == POOL_PAGES, 20, "the pool full")
    waiter = _post_async(decode.url, _leg(prefill, 7002, list(range(100, 120)), "wait"))
    wait_until(lambda: _rooms(decode.url) == 2, 20, "the second room to wait for pages")
    requests.post(decode.url + "/abort_request", json={"rid": "wait"}, timeout=10)
    answer = waiter.result(timeout=10)  # not the client's 30 s: the abort answers it
    assert answer.status_code == 200, answer.text
    assert answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
    requests.post(decode.url + "/abort_request", json={"rid": "hold"}, timeout=10)
    holder.result(timeout=10)
    wait_idle([prefill.url, decode.url], timeout_s=20)


def _used_pages(url: str) -> int:
    return get_load(url)[0]["num_used_pages"]


def test_a_room_queued_for_a_request_slot_outlives_the_bootstrap_deadline(pd, pair):
    """Waiting in decode's admission queue is no fault: a room turned away by
    --max-running-requests waits past --bootstrap-timeout-s on decode, and prefill keeps its
    request past that deadline while decode's leases come, until the slot frees. Both legs
    failed with a 504 at that deadline, so a batch larger than the request limit lost every
    request still queued after it. The holder's room names the module's prefill, whose
    default 30 s deadline for the page list it parks there outlasts this test."""
    short = ["--bootstrap-timeout-s", "1"]
    prefill = pd.prefill(1, short)
    holder_prefill = pair[0]
    decode = pd.decode(1, [*short, "--max-running-requests", "1", "--kv-wait-timeout-s", "60"])
    # Decode leg only: it takes the one request slot and waits for KV that never comes.
    holder = _post_async(decode.url, _leg(holder_prefill, 7201, list(range(3, 23)), "slot"))
    wait_until(lambda: _used_pages(decode.url) > 0, 20, "the first room to take the slot")
    body = _leg(prefill, 7202, list(range(40, 60)), "queued")
    queued = _post_async(decode.url, body)
    prefill_leg = _post_async(prefill.url, dict(body, rid="queued-prefill"))
    wait_until(lambda: _rooms(prefill.url) == 1 and _rooms(decode.url) == 2, 20, "both legs")
    # Not a synchronisation: the test is that four bootstrap deadlines pass uneventfully.
    until = time.monotonic() + 4
    wait_until(lambda: time.monotonic() > until, 10, "four bootstrap deadlines")
    assert not queued.done() and not prefill_leg.done()
    assert _rooms(prefill.url) == 1 and _rooms(decode.url) == 2
    load = get_load(decode.url)[0]
    # Waiting: the holder (for its KV) and the queued room, which a router must see too.
    assert load["num_waiting_reqs"] == 2 and load["num_tokens"] == 40, load
    requests.post(decode.url + "/abort_request", json={"rid": "slot"}, timeout=10)
    assert holder.result(timeout=10).json()["meta_info"]["finish_reason"]["type"] == "abort"
    answer = queued.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["meta_info"]["finish_reason"]["type"] == "length"
    assert prefill_leg.result(timeout=30).status_code == 200
    wait_idle([prefill.url, holder_prefill.url, decode.url], timeout_s=20)


def test_a_room_waiting_for_a_shared_prefix_goes_on_when_that_room_is_aborted(pair):
    prefill, decode = pair
    shared = list(range(30, 30 + 2 * PAGE))
    first = _post_async(decode.url, _leg(prefill, 7101, shared + [1, 2, 3], "first"))
    wait_until(lambda: _used_pages(decode.url) == 3, 20, "the first room to reserve")
    second_body = _leg(prefill, 7102, shared + [4, 5, 6, 7], "second")
    second = _post_async(decode.url, second_body)
    wait_until(lambda: _rooms(decode.url) == 2, 20, "the second room to wait for the prefix")
    assert _used_pages(decode.url) == 3  # it waits for the first room's KV, holding nothing
    requests.post(decode.url + "/abort_request", json={"rid": "first"}, timeout=10)
    assert first.result(timeout=10).json()["meta_info"]["finish_reason"]["type"] == "abort"
    # Nothing is coming for the prefix any more: the second room reserves it all now.
    wait_until(lambda: _used_pages(decode.url) == 3 and _rooms(decode.url) == 1, 10, "reserve")
    prefill_body = dict(second_body, rid="second-prefill")
    assert requests.post(prefill.url + "/generate", json=prefill_body, timeout=30).ok
    answer = second.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["meta_info"]["finish_reason"]["type"] == "length"
    wait_idle([prefill.url, decode.url], timeout_s=20)


def test_rooms_waiting_for_a_shared_prefix_fail_when_its_prefill_worker_dies(pd):
    prefill = pd.prefill(1)
    decode = pd.decode(
        1,
        [
            *["--heartbeat-interval-s", "0.2", "--heartbeat-timeout-s", "1.0"],
            *["--kv-share-wait-s", str(SHARE_WAIT_S), "--bootstrap-timeout-s", "200"],
        ],
    )
    shared = list(range(30, 30 + 2 * PAGE))
    first = _post_async(decode.url, _leg(prefill, 7201, shared + [1, 2, 3], "first"))
    wait_until(lambda: _used_pages(decode.url) == 3, 20, "the first room to reserve")
    second = _post_async(decode.url, _leg(prefill, 7202, shared + [4, 5, 6, 7], "second"))
    wait_until(lambda: _rooms(decode.url) == 2, 20, "the second room to wait for the prefix")
    worker_pid = requests.get(prefill.url + "/server_info", timeout=5).json()["worker_pids"][0]
    os.kill(worker_pid, signal.SIGKILL)
    for future in (first, second):
        answer = future.result(timeout=20)  # the heartbeat window, not the share wait
        assert answer.status_code == 503, answer.text
        assert "lost the connection to prefill worker" in answer.json()["error"]["message"]
    wait_until(lambda: _used_pages(decode.url) == 0 and _rooms(decode.url) == 0, 10, "idle")
