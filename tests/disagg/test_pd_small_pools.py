"""Prefill and decode with KV pools of a few requests each, under more concurrent PD
requests than either holds: prefill computes only what decode can take (no room holds
prefill pages while its decode waits for pages held by rooms prefill cannot compute), so
every request completes with the colocated server's tokens, and both pools end empty."""

from __future__ import annotations

import concurrent.futures
import random

import pytest
import requests

from tests.disagg.pd_driver import (
    get_load,
    metric_value,
    pages_in_use,
    pd_generate_async,
    rooms_in_flight,
    run_many,
    wait_idle,
)
from tests.helpers import wait_until

PAGE = 16
PREFILL_POOL_PAGES = 12
DECODE_POOL_PAGES = 7
NUM_REQUESTS = 24
# Far more than the whole run needs once served in order (and than the second test needs to
# see its legs wait), short enough that a room blocked on the other side's pool (the failure
# this tests) ends in a 504 within the test.
BOOTSTRAP_TIMEOUT_S = 15
# 4 pages: prefill computes up to 8 pages' worth of prompts before their page list comes.
CONTEXT_LEN = 64


def _bodies() -> list[dict]:
    rng = random.Random(5)
    sampling = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    # 2 or 3 pages a prompt: prefill holds 4 to 6 of them, decode 2 or 3.
    return [
        {
            "input_ids": [rng.randrange(3, 250) for _ in range(rng.randrange(20, 44))],
            "sampling_params": sampling,
        }
        for _ in range(NUM_REQUESTS)
    ]


@pytest.fixture(scope="module")
def pair(pd_module):
    common = ["--bootstrap-timeout-s", str(BOOTSTRAP_TIMEOUT_S)]
    common += ["--context-length", str(CONTEXT_LEN)]
    prefill = pd_module.prefill(1, ["--max-total-tokens", str(PREFILL_POOL_PAGES * PAGE), *common])
    decode = pd_module.decode(1, ["--max-total-tokens", str(DECODE_POOL_PAGES * PAGE), *common])
    return prefill, decode


def test_tiny_pools_on_both_sides_serve_every_request(pair, tiny_server):
    prefill, decode = pair
    bodies = _bodies()
    want = []
    for body in bodies:
        answer = requests.post(tiny_server.url + "/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        want.append(answer.json()["output_ids"])
    results = run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port
            )
            for body in bodies
        ]
    )
    errors = [
        (r.prefill.status, r.prefill.error, r.decode.status, r.decode.error)
        for r in results
        if not (r.prefill.ok and r.decode.ok)
    ]
    assert not errors, f"{len(errors)} of {NUM_REQUESTS} failed: {errors[:3]}"
    assert [r.decode.body["output_ids"] for r in results] == want
    wait_idle([prefill.url, decode.url])


def _load(url: str) -> tuple[int, int, int]:
    (rank,) = get_load(url)
    return rank["num_waiting_reqs"], rank["num_used_pages"], rank["num_tokens"]


def test_prefill_legs_past_the_early_budget_wait_outside_the_engine(pair):
    """Without their decode legs: two prompts of 3 pages are computed early (6 of the 12 - 4
    pages allowed), the third waits, counted as waiting and its prompt in the load's tokens
    (as the engine counts a waiting request's: a router balancing on tokens sees it); aborts
    answer all three."""
    prefill, _ = pair
    sampling = {"max_new_tokens": 4, "temperature": 0}
    bodies = [
        {
            "input_ids": [3 + i] * (3 * PAGE),
            "sampling_params": sampling,
            "rid": f"early-{i}",
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": 4240 + i,
        }
        for i in range(3)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        legs = []
        for body in bodies:  # in order: the third is the one past the budget
            legs.append(
                pool.submit(requests.post, prefill.url + "/generate", json=body, timeout=30)
            )
            wait_until(lambda: rooms_in_flight(prefill.url) == len(legs), 10, "the leg to arrive")
        # The computed legs hold their prompt and first token, the waiting one its prompt.
        want = (1, 6, 2 * (3 * PAGE + 1) + 3 * PAGE)
        wait_until(lambda: _load(prefill.url) == want, 10, "two legs computed, one waiting")
        # The metrics come from the same load reports.
        assert metric_value(prefill.url, "pdserve_num_waiting_reqs") == 1
        assert metric_value(prefill.url, "pdserve_num_tokens") == want[2]
        for body in bodies:
            requests.post(prefill.url + "/abort_request", json={"rid": body["rid"]}, timeout=10)
        for leg in legs:
            answer = leg.result(timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle([prefill.url])


def _rooms(prefill, decode) -> int | None:
    """Rooms in flight on both servers, when they agree (None otherwise)."""
    counts = {rooms_in_flight(prefill.url), rooms_in_flight(decode.url)}
    return counts.pop() if len(counts) == 1 else None


def _leg(prefill, room: int, rid: str, prompt_len: int) -> dict:
    return {
        "input_ids": [3 + room % 200] * prompt_len,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "rid": rid,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": room,
    }


def test_a_decode_leg_aborted_while_waiting_for_pages_stops_its_prefill_leg(pair):
    """Decode legs whose prefill legs never come fill decode's pool, so three rooms wait on
    decode for pages, with no page list on prefill: two computed early, the third parked.
    Aborting their decode legs answers the prefill legs at once with the reason (not a 504
    at the bootstrap deadline), and both servers end empty."""
    prefill, decode = pair
    blockers = [_leg(prefill, 5150, "blocker-0", 60), _leg(prefill, 5151, "blocker-1", 44)]
    rooms = [_leg(prefill, 5160 + i, f"waits-{i}", 3 * PAGE) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:

        def post(url: str, body: dict) -> concurrent.futures.Future:
            return pool.submit(requests.post, url + "/generate", json=body, timeout=60)

        blocked = [post(decode.url, body) for body in blockers]
        wait_until(lambda: pages_in_use(decode.url) == DECODE_POOL_PAGES, 10, "decode full")
        legs = []
        for body in rooms:  # in order: the third is past prefill's early budget
            legs.append((post(prefill.url, body), post(decode.url, body)))
            wait_until(lambda: _rooms(prefill, decode) == 2 + len(legs), 10, "both legs")
        wait_until(lambda: _load(prefill.url)[:2] == (1, 6), 10, "two legs computed, one parked")
        for body in rooms:
            requests.post(decode.url + "/abort_request", json={"rid": body["rid"]}, timeout=10)
        for prefill_leg, decode_leg in legs:
            answer = prefill_leg.result(timeout=30)
            assert answer.status_code == 499, answer.text
            assert "aborted on decode: aborted by /abort_request" in answer.text
            meta = decode_leg.result(timeout=10).json()["meta_info"]
            assert meta["finish_reason"]["type"] == "abort"
        for body in blockers:
            requests.post(decode.url + "/abort_request", json={"rid": body["rid"]}, timeout=10)
        for leg in blocked:
            leg.result(timeout=10)
    wait_idle([prefill.url, decode.url])
    assert _load(prefill.url) == (0, 0, 0)
