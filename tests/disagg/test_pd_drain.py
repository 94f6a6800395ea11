"""A PD server's drain (SIGTERM) with legs that no worker holds yet."""

from __future__ import annotations

import signal

import pytest

from pdserve.serving.hooks import SHUTTING_DOWN
from tests.disagg.pd_driver import (
    leg_body,
    metric_value,
    post_async,
    random_room,
    wait_idle,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)
IDS = list(range(5, 40))


def test_a_decode_leg_resolving_its_prefill_rank_is_answered_503_by_the_drain(pd):
    """A decode leg waits for its room's prefill rank (prefill registers every room under
    round_robin; its leg has not come) when decode is stopped. The drain counted only the
    requests a worker held, so it ended at once, and aiohttp hung up on this leg unanswered
    after its handler grace; now the drain waits for it too and, at its deadline, answers
    it 503. The prefill leg that comes later fails at once for the same reason: decode's
    stop cancelled its report of the failure to prefill's bootstrap server while unsent,
    and that leg waited for the page list until its bootstrap deadline (30 s, a 504)."""
    prefill = pd.prefill(2, ["--load-balance-method", "round_robin"])
    decode = pd.decode(1, ["--shutdown-timeout-s", "2"])
    room = random_room()
    decode_leg = post_async(decode.url, leg_body(prefill.bootstrap_port, room, IDS, "d"))
    queries = lambda: metric_value(prefill.url, "pdserve_bootstrap_queries_total")  # noqa: E731
    wait_until(lambda: queries() > 0, 30, "decode to ask for the room's rank")
    decode.signal_group(signal.SIGTERM)
    resp = decode_leg.result(60)
    assert resp.status_code == 503 and resp.json()["error"]["message"] == SHUTTING_DOWN, resp.text
    assert decode.proc.wait(30) == 0
    prefill_leg = post_async(prefill.url, leg_body(prefill.bootstrap_port, room, IDS, "p"))
    resp = prefill_leg.result(60)
    error = resp.json()["error"]
    assert resp.status_code == 503 and SHUTTING_DOWN in error["message"], resp.text
    assert error["origin"] == "decode"
    wait_idle([prefill.url])
