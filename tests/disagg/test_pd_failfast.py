"""Fail fast on both legs: a rejection on one leg fails the other within 2 s with the same
reason (every DP shape, either leg first), a dead prefill server is reported to new requests
within 3 s naming its address and is usable again soon after it restarts, and a prefill
server is healthy only once its bootstrap server can hand out every worker's endpoint.
The load-balance x FORCE matrix of one-leg rejections is in test_pd_rank_matrix.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import time
from collections.abc import Callable

import msgspec
import pytest
import requests
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.bootstrap_registry import WorkerRegistration
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.transfer import Inbound, make_transport
from tests.disagg.conftest import TINY, Prefill
from tests.disagg.pd_driver import (
    metric_value,
    pages_in_use,
    pd_generate,
    random_room,
    rooms_in_flight,
    wait_idle,
)
from tests.helpers import ServerProcess, free_port, launch_server, wait_until

BODY = {
    "input_ids": list(range(10, 40)),
    "sampling_params": {"max_new_tokens": 3, "temperature": 0},
}
FAIL_WITHIN_S = 2.0
DEAD_WITHIN_S = 3.0


def _leg(bootstrap_port: int, room: int, **extra) -> dict:
    return dict(
        BODY,
        bootstrap_host="127.0.0.1",
        bootstrap_port=bootstrap_port,
        bootstrap_room=room,
        **extra,
    )


def _timed_post(url: str, body: dict, timeout_s: float = 30) -> tuple[requests.Response, float]:
    start = time.monotonic()
    resp = requests.post(url + "/generate", json=body, timeout=timeout_s)
    return resp, time.monotonic() - start


def _check_fast_failure(resp: requests.Response, elapsed_s: float, reason: str, where: str):
    assert resp.status_code >= 400, f"{where}: {resp.status_code} {resp.text}"
    message = resp.json()["error"]["message"]
    assert reason in message, f"{where}: {message}"
    assert elapsed_s < FAIL_WITHIN_S, f"{where}: took {elapsed_s:.2f}s"


@pytest.fixture(scope="module")
def decodes(pd_module) -> Callable[[int], ServerProcess]:
    """Decode servers by DP size, each started once: the 1-1 and 3-1 shapes share one (the
    rooms are random, and a prefill's ports are never handed out again), as do the tests
    that kill or restart a prefill of their own (decode's counters are read as deltas)."""
    started: dict[int, ServerProcess] = {}

    def decode(dp_size: int) -> ServerProcess:
        if dp_size not in started:
            started[dp_size] = pd_module.decode(dp_size)
        return started[dp_size]

    return decode


@pytest.fixture(scope="module", params=[(1, 1), (2, 2), (3, 1)], ids=lambda s: f"dp{s[0]}-{s[1]}")
def pair(request, pd_module, decodes):
    prefill_dp, decode_dp = request.param
    prefill = pd_module.prefill(prefill_dp)
    yield prefill, decodes(decode_dp), prefill_dp, decode_dp
    prefill.server.stop()


def _one_leg_cases(prefill_dp: int, decode_dp: int) -> dict[str, tuple[dict, dict, str]]:
    """case -> (prefill extra fields, decode extra fields, reason both legs must give)."""
    return {
        "prefill_rank_out_of_range": (
            {"routed_dp_rank": prefill_dp},
            {},
            f"out of range: dp_size is {prefill_dp}",
        ),
        "decode_rank_out_of_range": (
            {},
            {"routed_dp_rank": decode_dp},
            f"out of range: dp_size is {decode_dp}",
        ),
        "prefill_bad_sampling": (
            {"sampling_params": {"temperature": -1}},
            {},
            "temperature must be >= 0",
        ),
        "decode_bad_sampling": ({}, {"sampling_params": {"top_p": 2}}, "top_p must be in"),
    }


def test_rejection_on_one_leg_fails_both_legs_fast(pair):
    """Both legs fail at once with the rejecting leg's reason; the other leg marks it as its
    peer's fault (`origin`): a prefill leg failed by decode's refusal had no origin, and a
    router that got it first took the fault for prefill's own."""
    prefill, decode, prefill_dp, decode_dp = pair
    for case, (p_extra, d_extra, reason) in _one_leg_cases(prefill_dp, decode_dp).items():
        rejecting = case.split("_")[0]
        result = pd_generate(
            prefill.url,
            decode.url,
            BODY,
            bootstrap_port=prefill.bootstrap_port,
            prefill_extra=p_extra,
            decode_extra=d_extra,
            timeout_s=30,
        )
        for name, leg in (("prefill", result.prefill), ("decode", result.decode)):
            where = f"{case}, {name} leg"
            assert 400 <= leg.status < 600, f"{where}: {leg.status} {leg.body}"
            assert reason in leg.error, f"{where}: {leg.error}"
            assert leg.elapsed_s < FAIL_WITHIN_S, f"{where}: took {leg.elapsed_s:.2f}s"
            origin = None if name == rejecting else rejecting
            assert leg.body["error"].get("origin") == origin, f"{where}: {leg.body}"
    wait_idle([prefill.url, decode.url])


@pytest.mark.parametrize("rejecting", ["prefill", "decode"])
def test_leg_arriving_after_the_other_was_rejected_fails_at_once(pair, rejecting):
    """The rejected leg has answered before its peer leg even arrives: the late leg must
    still fail at once (the failure was recorded, not only sent to legs in flight)."""
    prefill, decode, prefill_dp, decode_dp = pair
    cases = _one_leg_cases(prefill_dp, decode_dp)
    p_extra, d_extra, reason = cases[f"{rejecting}_rank_out_of_range"]
    room = random_room()
    first, second = (
        (prefill.url, decode.url) if rejecting == "prefill" else (decode.url, prefill.url)
    )
    first_extra, second_extra = (p_extra, d_extra) if rejecting == "prefill" else (d_extra, p_extra)
    resp, elapsed_s = _timed_post(first, _leg(prefill.bootstrap_port, room, **first_extra))
    _check_fast_failure(resp, elapsed_s, reason, f"{rejecting} leg")
    resp, elapsed_s = _timed_post(second, _leg(prefill.bootstrap_port, room, **second_extra))
    _check_fast_failure(resp, elapsed_s, reason, "the later leg")
    assert resp.json()["error"].get("origin") == rejecting, resp.text  # its peer's fault
    wait_idle([prefill.url, decode.url])


def _prefill_args(dp_size: int, bootstrap_port: int) -> list[str]:
    return [
        *TINY,
        "--mode",
        "prefill",
        "--dp-size",
        str(dp_size),
        "--bootstrap-port",
        str(bootstrap_port),
    ]


def _start_prefill(pd, port: int, bootstrap_port: int, dp_size: int = 1) -> Prefill:
    server = launch_server(
        _prefill_args(dp_size, bootstrap_port),
        port=port,
        extra_ready_urls=[f"http://127.0.0.1:{bootstrap_port}/route"],
    )
    pd.started.append(server)
    return Prefill(server, bootstrap_port)


def _pd_ok(prefill: Prefill, decode) -> bool:
    result = pd_generate(
        prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port, timeout_s=30
    )
    return result.prefill.ok and result.decode.ok


def _epoch(bootstrap_port: int, query: str = "") -> int:
    return requests.get(f"http://127.0.0.1:{bootstrap_port}/route{query}", timeout=5).json()[
        "epoch"
    ]


def test_dead_prefill_server_is_reported_in_seconds_and_recovers_after_restart(pd, decodes):
    port, bootstrap_port = free_port(), free_port()
    prefill = _start_prefill(pd, port, bootstrap_port)
    decode = decodes(1)
    epoch_changes = "pdserve_prefill_epoch_changes_total"
    epoch_changes_before = metric_value(decode.url, epoch_changes)
    assert _pd_ok(prefill, decode)  # decode now caches the server's info and endpoint
    first_epoch = _epoch(bootstrap_port)
    assert _epoch(bootstrap_port, "?prefill_dp_rank=0") == first_epoch
    prefill.server.signal_group(signal.SIGKILL)  # front end and workers at once
    prefill.server.proc.wait(timeout=10)
    # From decode's caches (the dead KV endpoint) unless its worker has already reported
    # the dropped connection, then from the bootstrap server.
    for attempt in ("first", "second"):
        resp, elapsed_s = _timed_post(decode.url, _leg(bootstrap_port, random_room()))
        where = f"{attempt}: {resp.status_code} {resp.text}"
        assert resp.status_code == 503, where
        message = resp.json()["error"]["message"]
        # The cached endpoint's open connection may be seen closed before the new room's
        # connect fails: either is a dead prefill named at once.
        dead = ("cannot connect", "lost the connection to prefill worker", "is unreachable")
        assert any(d in message for d in dead) and "127.0.0.1:" in message, where
        assert elapsed_s < DEAD_WITHIN_S, f"{attempt}: took {elapsed_s:.2f}s"
    assert f"127.0.0.1:{bootstrap_port}" in message, "the bootstrap server's address is named"
    wait_idle([decode.url])

    restarted = _start_prefill(pd, port, bootstrap_port)
    ready_at = time.monotonic()
    new_epoch = _epoch(bootstrap_port)
    assert new_epoch != first_epoch, "a restarted server has a new epoch"
    assert _epoch(bootstrap_port, "?prefill_dp_rank=0") == new_epoch
    while not _pd_ok(restarted, decode):
        assert time.monotonic() - ready_at < 5.0, "no success within 5 s of the restart"
    # Decode saw the new epoch and dropped what it had cached of the old start.
    assert metric_value(decode.url, epoch_changes) == epoch_changes_before + 1
    wait_idle([restarted.url, decode.url])


def test_a_prefill_restarted_between_requests_serves_the_first_request_after_it(pd, decodes):
    """No request saw the prefill server die: decode's worker saw its KV connection drop
    and its front end forgot the dead endpoint, so the first request after the restart
    asks the bootstrap server for the new one instead of failing on the old."""
    port, bootstrap_port = free_port(), free_port()
    prefill = _start_prefill(pd, port, bootstrap_port)
    decode = decodes(1)
    assert _pd_ok(prefill, decode)  # decode now caches the server's info and endpoint
    prefill.server.signal_group(signal.SIGKILL)
    prefill.server.proc.wait(timeout=10)
    restarted = _start_prefill(pd, port, bootstrap_port)
    result = pd_generate(
        restarted.url, decode.url, BODY, bootstrap_port=bootstrap_port, timeout_s=30
    )
    assert result.prefill.ok and result.decode.ok, result
    wait_idle([restarted.url, decode.url])


def test_prefill_is_healthy_only_once_every_worker_can_be_found():
    """launch_server returns at the first /health 200: GET /route must already answer."""
    bootstrap_port = free_port()
    with launch_server(_prefill_args(2, bootstrap_port)) as server:
        route = f"http://127.0.0.1:{bootstrap_port}/route"
        assert requests.get(route, timeout=5).status_code == 200
        for rank in (0, 1):
            worker = requests.get(f"{route}?prefill_dp_rank={rank}", timeout=5)
            assert worker.status_code == 200 and worker.json()["kv_endpoint"], worker.text
        assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_decode_killed_under_a_live_prefill_frees_prefill_state_and_a_new_decode_works(pd, decodes):
    """Decode sent its page list, then died before the prefill leg arrived: prefill drops
    the dead peer's rooms (no pages held for nobody), the late prefill leg fails at once
    with the reason, and a decode new to it (the module's, never its peer before) is
    served right away."""
    prefill = pd.prefill(1)
    decode = pd.decode(1)
    room = random_room()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_timed_post, decode.url, _leg(prefill.bootstrap_port, room))
        wait_until(lambda: rooms_in_flight(prefill.url) > 0, 20, "decode's page list at prefill")
        decode.signal_group(signal.SIGKILL)
        with contextlib.suppress(requests.RequestException):
            pending.result(timeout=30)  # the connection to the killed decode server breaks
    wait_until(lambda: rooms_in_flight(prefill.url) == 0, DEAD_WITHIN_S, "prefill to drop the room")
    resp, elapsed_s = _timed_post(prefill.url, _leg(prefill.bootstrap_port, room))
    _check_fast_failure(resp, elapsed_s, "lost the connection to decode", "late prefill leg")
    wait_idle([prefill.url])
    fresh = decodes(1)
    assert _pd_ok(prefill, fresh)
    wait_idle([prefill.url, fresh.url])


def _handshake_as_decode(endpoint: str, layout, epoch: int, room: int | None = None):
    """A decode worker's first words over a real KV connection: Handshake with `epoch`
    (same decode identity each time), then, if `room` is given, a page list for it."""
    transport = make_transport("zmq", torch.zeros((4, 1)), listen_host=None)
    peer = transport.connect(endpoint)
    transport.send(peer, m.Handshake(decode_id="decode-test-dp0", layout=layout, epoch=epoch))
    answer = _next_message(transport)
    assert isinstance(answer, m.HandshakeResult) and answer.ok, answer
    if room is not None:
        page_list = m.PageList(
            room=room,
            dst_page_ids=[0, 1, 2],
            prompt_len=len(BODY["input_ids"]),
            prompt_digest=prompt_digest(BODY["input_ids"]),
        )
        transport.send(peer, page_list)
    return transport


def _next_message(transport, timeout_s: float = 10.0) -> m.ChannelMsg:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in transport.poll(50):
            if isinstance(event, Inbound):
                return event.msg
    raise AssertionError(f"no message within {timeout_s:g}s")


def test_decode_restarted_under_a_live_prefill_drops_the_old_epoch_rooms(pd, decodes):
    """A decode server restarts while its old KV connection still looks alive (no loss
    reported): its handshake with a new epoch makes prefill fail the rooms of the old epoch
    and free their pages; their late prefill legs fail at once with the reason."""
    prefill = pd.prefill(1)
    route = f"http://127.0.0.1:{prefill.bootstrap_port}/route?prefill_dp_rank=0"
    worker = msgspec.convert(requests.get(route, timeout=5).json(), WorkerRegistration)
    room = random_room()
    old = _handshake_as_decode(worker.kv_endpoint, worker.layout(), epoch=11, room=room)
    new = None
    try:
        wait_until(lambda: rooms_in_flight(prefill.url) == 1, 10, "the old epoch's page list")
        new = _handshake_as_decode(worker.kv_endpoint, worker.layout(), epoch=12)
        wait_until(lambda: rooms_in_flight(prefill.url) == 0, FAIL_WITHIN_S, "the room dropped")
        resp, elapsed_s = _timed_post(prefill.url, _leg(prefill.bootstrap_port, room))
        _check_fast_failure(resp, elapsed_s, "restarted (new epoch)", "late prefill leg")
        assert pages_in_use(prefill.url) == 0
    finally:
        for transport in (old, new):
            if transport is not None:
                transport.close()
    decode = decodes(1)
    assert _pd_ok(prefill, decode)
    wait_idle([prefill.url, decode.url])
