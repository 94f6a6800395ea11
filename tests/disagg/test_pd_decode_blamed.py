"""A room prefill fails for its decode peer's fault (no page list within
--bootstrap-timeout-s: a frozen or late decode) is decode's fault on both legs: prefill's
leg carries `origin: decode`, and decode's leg, which learns of the failure from prefill
(the KV channel's failed RoomStatus, or the failure a rank query answers), carries no
`origin`. It carried `origin: prefill`: both legs blamed each other, and a router that got
decode's answer first charged a sound prefill server's breaker for a frozen decode."""

from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.disagg.conftest import Prefill
from tests.disagg.pd_driver import leg_body, post_async, random_room, wait_idle
from tests.helpers import ServerProcess

# Prefill's wait for decode's page list. A failed room's answer to a late page list is kept
# this long too, so a resumed decode worker must send its page list within it.
PREFILL_DEADLINE_S = 3
PAGE_LIST_WAIT = f"timed out after {PREFILL_DEADLINE_S}s waiting for decode's page list"


@pytest.fixture(scope="module")
def decode(pd_module) -> ServerProcess:
    return pd_module.decode(1)


def _prefill(pd_module, dp_size: int = 1, *args: str) -> Prefill:
    return pd_module.prefill(dp_size, ["--bootstrap-timeout-s", str(PREFILL_DEADLINE_S), *args])


def _check_prefill_leg(answer: requests.Response) -> None:
    """Prefill failed the room waiting for decode's page list: decode's fault."""
    error = answer.json()["error"]
    assert answer.status_code == 504 and PAGE_LIST_WAIT in error["message"], answer.text
    assert error.get("origin") == "decode", answer.text


def _check_decode_leg(answer: requests.Response) -> None:
    """Decode's leg ends with prefill's reason, as its own fault (no origin)."""
    error = answer.json()["error"]
    assert answer.status_code == 504 and PAGE_LIST_WAIT in error["message"], answer.text
    assert "origin" not in error, answer.text


def test_a_frozen_decode_workers_leg_of_a_room_prefill_failed_for_it_has_no_origin(
    pd_module, decode
):
    """The decode worker is stopped with the room's request in its socket; prefill's leg
    fails first. Once resumed, the worker hands prefill its page list and hears the failure
    on the KV channel (the fast path: one prefill rank, nothing queried)."""
    prefill = _prefill(pd_module)
    [worker_pid] = requests.get(decode.url + "/server_info", timeout=10).json()["worker_pids"]
    leg = leg_body(prefill.bootstrap_port, random_room(), list(range(3, 40)), "frozen")
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        decode_leg = post_async(decode.url, leg)
        _check_prefill_leg(requests.post(prefill.url + "/generate", json=leg, timeout=60))
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    _check_decode_leg(decode_leg.result(timeout=60))
    wait_idle([prefill.url, decode.url], timeout_s=30)


def test_a_late_decode_leg_of_a_room_prefill_failed_for_it_has_no_origin(pd_module, decode):
    """Two prefill ranks, each room's published (--force-query-prefill-dp-rank): a decode
    leg that comes after prefill failed the room learns it from its rank query."""
    prefill = _prefill(pd_module, 2, "--force-query-prefill-dp-rank")
    leg = leg_body(prefill.bootstrap_port, random_room(), list(range(3, 40)), "late")
    _check_prefill_leg(requests.post(prefill.url + "/generate", json=leg, timeout=60))
    _check_decode_leg(requests.post(decode.url + "/generate", json=leg, timeout=60))
    wait_idle([prefill.url, decode.url], timeout_s=30)
