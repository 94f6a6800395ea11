"""--rank-mismatch forward over real servers (docs/protocol.md section 10): rooms routed off their
home worker are served with the colocated tokens, no rank query and no abort; every failure
of the relay ends with a clear error within its deadline and frees the pages."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import requests

from tests.disagg.pd_driver import (
    get_load,
    metric_value,
    pages_in_use,
    pd_generate_async,
    run_many,
    wait_idle,
)
from tests.disagg.test_pd_faults import _leg as _faults_leg
from tests.disagg.test_pd_faults import _post_async
from tests.helpers import wait_until

BODY = {
    "input_ids": [5, 17, 99, 23, 42, 7, 8, 200, 31, 64, 12, 77, 3, 150, 9, 10, 11, 12],
    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
}
BOOTSTRAP_TIMEOUT_S = 3.0
FORWARD = ["--rank-mismatch", "forward", "--bootstrap-timeout-s", str(BOOTSTRAP_TIMEOUT_S)]
DECODE = ["--kv-wait-timeout-s", "20", "--bootstrap-timeout-s", str(BOOTSTRAP_TIMEOUT_S)]

COUNTERS = {
    "queries": ("decode", "pdserve_rank_query_round_trips_total", None),
    "fast_path": ("decode", "pdserve_rank_resolutions_total", {"path": "fast_path"}),
    "explicit": ("decode", "pdserve_rank_resolutions_total", {"path": "explicit"}),
    "relayed": ("decode", "pdserve_kv_relay_seconds_count", None),
    "decode_failures": ("decode", "pdserve_disagg_failures_total", None),
    "forwarded": ("prefill", "pdserve_rooms_forwarded_total", None),
    "bootstrap_queries": ("prefill", "pdserve_bootstrap_queries_total", None),
    "conflicts": ("prefill", "pdserve_rank_conflicts_total", None),
    "prefill_failures": ("prefill", "pdserve_disagg_failures_total", None),
}


@pytest.fixture(scope="module")
def want(tiny_server) -> list[int]:
    return requests.post(tiny_server.url + "/generate", json=BODY, timeout=60).json()["output_ids"]


@pytest.fixture(scope="module")
def forward_decode(pd_module):
    """One decode server for both prefill shapes: the tests count its metrics as deltas,
    and each prefill is another peer to it (ports are never handed out twice)."""
    return pd_module.decode(2, DECODE)


@pytest.fixture(scope="module")
def forward_prefill_dp2(pd_module):
    """The DP 2 forwarding prefill, shared by `servers` and the tests that only need a live
    one (each leaves it idle)."""
    return pd_module.prefill(2, FORWARD)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda dp: f"prefill-dp{dp}")
def servers(request, pd_module, forward_decode):
    dp = request.param
    if dp == 2:
        yield dp, request.getfixturevalue("forward_prefill_dp2"), forward_decode
        return
    prefill = pd_module.prefill(dp, FORWARD)
    yield dp, prefill, forward_decode
    prefill.server.stop()


def _leg(bootstrap_port: int, room: int, **extra) -> dict:
    return _faults_leg(bootstrap_port, room, body=BODY, **extra)


def _decode_only(decode_url: str, bootstrap_port: int, room: int) -> requests.Response:
    return requests.post(decode_url + "/generate", json=_leg(bootstrap_port, room), timeout=30)


def _counters(prefill, decode) -> dict[str, float]:
    urls = {"prefill": prefill.url, "decode": decode.url}
    return {
        name: metric_value(urls[side], metric, labels)
        for name, (side, metric, labels) in COUNTERS.items()
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def _other(room: int, dp: int, rng: random.Random) -> int:
    return (room % dp + 1 + rng.randrange(dp - 1)) % dp


def test_mode_is_advertised(servers):
    _, prefill, _ = servers
    info = requests.get(prefill.url + "/server_info", timeout=5).json()
    route = requests.get(f"http://127.0.0.1:{prefill.bootstrap_port}/route", timeout=5).json()
    assert info["rank_mismatch"] == route["rank_mismatch"] == "forward"
    assert route["follow_bootstrap_room"] and not route["registers_all_rooms"]


@pytest.mark.parametrize("kind", ["aligned", "divergent", "mixed"])
def test_routed_rooms_give_colocated_tokens_without_query_or_abort(servers, want, kind):
    dp, prefill, decode = servers
    rng = random.Random(f"{kind}-{dp}")
    cells = []
    for i in range(24):
        room = rng.randrange(2**63)
        cell = kind if kind != "mixed" else ["aligned", "divergent", "unrouted"][i % 3]
        routed = {"aligned": room % dp, "divergent": _other(room, dp, rng)}.get(cell)
        cells.append((cell, room, {} if routed is None else {"routed_dp_rank": routed}))
    before = _counters(prefill, decode)
    results = run_many(
        lambda s: [
            pd_generate_async(
                s,
                prefill.url,
                decode.url,
                BODY,
                bootstrap_port=prefill.bootstrap_port,
                room=room,
                prefill_extra=fields,
                timeout_s=60,
            )
            for _, room, fields in cells
        ]
    )
    for (cell, room, fields), result in zip(cells, results, strict=True):
        where = f"{cell} room={room} {fields}"
        assert result.prefill.ok, f"{where}: prefill {result.prefill.error}"
        assert result.decode.ok, f"{where}: decode {result.decode.error}"
        assert result.decode.body["output_ids"] == want, where
    num_divergent = sum(cell == "divergent" for cell, _, _ in cells)
    delta = _delta(before, _counters(prefill, decode))
    assert delta == dict(
        queries=0,
        fast_path=len(cells),
        explicit=0,
        relayed=num_divergent,
        decode_failures=0,
        forwarded=num_divergent,
        bootstrap_queries=0,
        conflicts=0,
        prefill_failures=0,
    )
    wait_idle([prefill.url, decode.url])


def test_page_list_before_the_dispatch_is_redirected(servers, want):
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    home = room % dp
    pending = _post_async(decode.url, _leg(prefill.bootstrap_port, room))
    wait_until(
        lambda: get_load(prefill.url)[home]["num_disagg_rooms"] == 1,
        20,
        "decode's page list to reach the home worker",
    )
    other = _other(room, dp, random.Random(room))
    resp = requests.post(
        prefill.url + "/generate",
        json=_leg(prefill.bootstrap_port, room, routed_dp_rank=other),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    answer = pending.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_ids"] == want
    wait_idle([prefill.url, decode.url])


def test_decode_with_the_explicit_rank_goes_straight_to_the_serving_worker(servers, want):
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    other = _other(room, dp, random.Random(room))
    before = _counters(prefill, decode)
    result = run_many(
        lambda s: [
            pd_generate_async(
                s,
                prefill.url,
                decode.url,
                BODY,
                bootstrap_port=prefill.bootstrap_port,
                room=room,
                prefill_extra={"routed_dp_rank": other},
                decode_extra={"disagg_prefill_dp_rank": other},
            )
        ]
    )[0]
    assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
    assert result.decode.body["output_ids"] == want
    delta = _delta(before, _counters(prefill, decode))
    assert (delta["explicit"], delta["relayed"], delta["forwarded"]) == (1, 0, 1)
    wait_idle([prefill.url, decode.url])


@pytest.mark.parametrize("decode_first", [False, True], ids=["together", "decode-first"])
def test_legs_naming_different_ranks_are_served_where_dispatched(servers, want, decode_first):
    """The decode leg names another prefill rank than the one the prefill leg was routed
    to: the worker that got the page list (not the room's home) hands it on."""
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    served = _other(room, dp, random.Random(room))
    listed = room % dp  # decode's explicit rank: a worker other than the serving one
    decode_leg = _leg(prefill.bootstrap_port, room, disagg_prefill_dp_rank=listed)
    pending = _post_async(decode.url, decode_leg)
    if decode_first:
        wait_until(
            lambda: get_load(prefill.url)[listed]["num_disagg_rooms"] == 1,
            20,
            "decode's page list to reach the worker it names",
        )
    prefill_leg = _leg(
        prefill.bootstrap_port, room, routed_dp_rank=served, disagg_prefill_dp_rank=served
    )
    resp = requests.post(prefill.url + "/generate", json=prefill_leg, timeout=30)
    assert resp.status_code == 200, resp.text
    answer = pending.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_ids"] == want
    wait_idle([prefill.url, decode.url])


def test_room_never_dispatched_fails_at_the_kv_deadline(pd, forward_prefill_dp2):
    prefill = forward_prefill_dp2
    decode = pd.decode(1, ["--kv-wait-timeout-s", "1.5"])
    resp = _decode_only(decode.url, prefill.bootstrap_port, room=12345)
    assert resp.status_code == 504, resp.text
    assert "timed out after 1.5s waiting for the KV" in resp.json()["error"]["message"]
    wait_idle([prefill.url, decode.url])


def test_dispatched_room_without_decode_fails_at_the_bootstrap_deadline(servers):
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    other = _other(room, dp, random.Random(room))
    start = time.monotonic()
    resp = requests.post(
        prefill.url + "/generate",
        json=_leg(prefill.bootstrap_port, room, routed_dp_rank=other),
        timeout=30,
    )
    assert resp.status_code == 504, resp.text
    assert "waiting for decode's page list" in resp.json()["error"]["message"]
    assert time.monotonic() - start < BOOTSTRAP_TIMEOUT_S + 5
    wait_idle([prefill.url, decode.url])


def test_prefill_abort_before_the_page_list_fails_the_decode_leg_at_once(servers):
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    other = _other(room, dp, random.Random(room))
    pending = _post_async(
        prefill.url, _leg(prefill.bootstrap_port, room, routed_dp_rank=other, rid="fwd-abort")
    )
    wait_until(lambda: pages_in_use(prefill.url) > 0, 20, "prefill to hold the pages")
    requests.post(prefill.url + "/abort_request", json={"rid": "fwd-abort"}, timeout=10)
    answer = pending.result(timeout=30)
    assert (
        answer.status_code != 200 or answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
    )
    start = time.monotonic()
    resp = _decode_only(decode.url, prefill.bootstrap_port, room=room)
    assert resp.status_code >= 400 and "abort" in resp.json()["error"]["message"], resp.text
    assert time.monotonic() - start < BOOTSTRAP_TIMEOUT_S
    wait_idle([prefill.url, decode.url])


def test_decode_abort_while_parked_at_home_fails_the_prefill_leg_by_its_deadline(servers):
    dp, prefill, decode = servers
    room = random.randrange(2**63)
    home = room % dp
    pending = _post_async(decode.url, _leg(prefill.bootstrap_port, room, rid="fwd-dabort"))
    wait_until(
        lambda: get_load(prefill.url)[home]["num_disagg_rooms"] == 1, 20, "the parked page list"
    )
    requests.post(decode.url + "/abort_request", json={"rid": "fwd-dabort"}, timeout=10)
    pending.result(timeout=30)
    other = _other(room, dp, random.Random(room))
    resp = requests.post(
        prefill.url + "/generate",
        json=_leg(prefill.bootstrap_port, room, routed_dp_rank=other),
        timeout=30,
    )
    assert resp.status_code >= 400, resp.text
    wait_idle([prefill.url, decode.url])


def test_serving_worker_death_fails_the_decode_leg_at_once(pd, forward_decode):
    """A prefill of its own (its worker is killed); the shared decode."""
    prefill = pd.prefill(2, FORWARD)
    decode = forward_decode
    room = 2 * random.randrange(2**62)  # home 0, served by worker 1
    pending = _post_async(prefill.url, _leg(prefill.bootstrap_port, room, routed_dp_rank=1))
    wait_until(lambda: pages_in_use(prefill.url) > 0, 20, "worker 1 to hold the pages")
    worker_pid = requests.get(prefill.url + "/server_info", timeout=5).json()["worker_pids"][1]
    os.kill(worker_pid, signal.SIGKILL)
    assert pending.result(timeout=30).status_code >= 500
    start = time.monotonic()
    resp = _decode_only(decode.url, prefill.bootstrap_port, room=room)
    assert resp.status_code >= 400, resp.text
    assert time.monotonic() - start < BOOTSTRAP_TIMEOUT_S, resp.text
    wait_idle([decode.url])


def test_abort_mode_still_fails_divergent_rooms_on_both_legs(pd, forward_decode):
    """A prefill of its own (the default --rank-mismatch, abort); the shared decode."""
    prefill = pd.prefill(2)
    decode = forward_decode
    route = requests.get(f"http://127.0.0.1:{prefill.bootstrap_port}/route", timeout=5).json()
    assert route["rank_mismatch"] == "abort"
    room = 2 * random.randrange(2**62)
    result = run_many(
        lambda s: [
            pd_generate_async(
                s,
                prefill.url,
                decode.url,
                BODY,
                bootstrap_port=prefill.bootstrap_port,
                room=room,
                prefill_extra={"routed_dp_rank": 1},
                timeout_s=30,
            )
        ]
    )[0]
    for leg in (result.prefill, result.decode):
        assert "follow_bootstrap_room conflict" in leg.error, leg.error
    assert metric_value(prefill.url, "pdserve_rooms_forwarded_total") == 0
    wait_idle([prefill.url, decode.url])
