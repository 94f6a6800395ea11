"""The router's own stop (SIGTERM or SIGINT: `pdserve up`'s Ctrl-C, systemd's stop) with
requests in flight, against stub workers that hold their answers."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import open_sse, read_sse, wait_until
from tests.router.test_router_shell import pd_args

pytestmark = pytest.mark.timeout(120)
SHUTTING_DOWN = "the router is shutting down"


def refuses(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=5)
    except requests.ConnectionError:
        return True
    return False


def test_requests_in_flight_at_the_stop_deadline_are_answered_503(stubs, router_factory):
    """Past --shutdown-timeout-s, or at a second signal, the router hung up on every request
    still in flight: a whole answer's client read a dropped connection, a stream's a bare end
    of body, neither with a cause (its servers, draining too, answer theirs 503). Now the
    first gets a 503, the second an error event then `[DONE]`, and a second signal ends
    the drain at once (it did nothing: the router waited its fixed 10 s)."""
    router = router_factory([*pd_args(stubs), "--shutdown-timeout-s", "600"])
    held = {"d1": {"hold": "never"}, "d2": {"hold": "never"}}
    after_first = {"d1": {"hold_after_first": "never"}, "d2": {"hold_after_first": "never"}}
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(
            requests.post, router.url + "/generate", json={"text": "x", "stub": held}, timeout=60
        )
        stream = open_sse(
            router.url + "/generate", {"text": "x", "stream": True, "stub": after_first}
        )
        events = pool.submit(read_sse, stream)
        in_flight = lambda: len(stubs["d1"].log()["bodies"]) + len(stubs["d2"].log()["bodies"])  # noqa: E731
        wait_until(lambda: in_flight() == 2, 30, "both requests at decode")
        router.signal_group(signal.SIGTERM)
        wait_until(lambda: refuses(router.url), 30, "the drain (its port closed)")
        router.signal_group(signal.SIGTERM)
        resp, events = whole.result(30), events.result(30)
    assert resp.status_code == 503 and resp.json()["error"]["message"] == SHUTTING_DOWN, resp.text
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events
    assert events[-2]["error"]["message"] == SHUTTING_DOWN and "text" in events[0], events
    assert router.proc.wait(30) == 0
