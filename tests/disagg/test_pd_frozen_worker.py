"""A decode worker frozen (SIGSTOP) past --worker-heartbeat-timeout-s with one room running
and one queued behind --max-running-requests: both decode legs and the queued room's
prefill leg fail with a reason,
and once the worker runs again (the aborts waited in its socket) /health recovers, both
servers go back to 0 pages and 0 rooms, and a new request is served."""

from __future__ import annotations

import os
import signal

import requests

from tests.disagg.pd_driver import get_load, leg_body, post_async, wait_idle
from tests.helpers import wait_until


def _both_legs(prefill, decode_url: str, body: dict) -> tuple:
    decode_leg = post_async(decode_url, body)
    prefill_leg = post_async(prefill.url, dict(body, rid=body["rid"] + "-p"))
    return decode_leg, prefill_leg


def _health(url: str) -> int:
    return requests.get(url + "/health", timeout=10).status_code


def test_a_decode_worker_frozen_past_the_heartbeat_frees_everything_once_resumed(pd):
    prefill = pd.prefill(1)
    decode = pd.decode(1, ["--worker-heartbeat-timeout-s", "2", "--max-running-requests", "1"])
    port = prefill.bootstrap_port
    [worker_pid] = requests.get(decode.url + "/server_info", timeout=10).json()["worker_pids"]
    running = _both_legs(prefill, decode.url, leg_body(port, 8101, list(range(3, 40)), "run", 3000))
    wait_until(lambda: get_load(decode.url)[0]["num_running_reqs"] == 1, 30, "a room running")
    queued = _both_legs(prefill, decode.url, leg_body(port, 8102, list(range(50, 70)), "q", 4))
    wait_until(lambda: get_load(decode.url)[0]["num_reqs"] == 2, 30, "a room queued")
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        assert running[1].result(timeout=40).status_code == 200  # its KV was sent before
        for leg in (running[0], *queued):
            answer = leg.result(timeout=40)
            assert answer.status_code >= 400, answer.text
            assert answer.json()["error"]["message"], answer.text
        assert _health(decode.url) == 503
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    wait_until(lambda: _health(decode.url) == 200, 30, "decode healthy again")
    wait_idle([prefill.url, decode.url], timeout_s=30)
    again = _both_legs(prefill, decode.url, leg_body(port, 8103, list(range(80, 99)), "again", 4))
    for leg in again:
        assert leg.result(timeout=40).status_code == 200
    wait_idle([prefill.url, decode.url], timeout_s=30)
