"""A worker process that stops (SIGSTOP, or stuck where no thread of it runs) while its
front end lives: its requests fail with a 503 naming it within the heartbeat timeout, new
requests avoid it, /health answers 503 (a router takes the server out), and all of it
recovers when the worker runs again. It used to hang its requests until their deadline and
pass /health. Real server processes."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import http_json, launch_server, wait_healthy_and_idle, wait_until

LONG = {"max_new_tokens": 3000, "ignore_eos": True}
SHORT = {"max_new_tokens": 4, "temperature": 0.0}
TIMEOUT_S = 2


@pytest.fixture
def dp2_server():
    args = [*TINY_ARGS, "--dp-size", "2", "--worker-heartbeat-timeout-s", str(TIMEOUT_S)]
    with launch_server(args) as server:
        yield server


def _loads(url: str) -> list[dict]:
    return http_json("GET", f"{url}/get_load")[1]


def _generate(url: str, rank: int | None = None, sampling: dict = SHORT) -> tuple[int, dict]:
    body = {"text": "hello", "sampling_params": sampling}
    if rank is not None:
        body["routed_dp_rank"] = rank
    return http_json("POST", f"{url}/generate", body, 60)


def test_a_stopped_worker_fails_its_requests_and_health_until_it_runs_again(dp2_server):
    url = dp2_server.url
    worker_pids = http_json("GET", f"{url}/server_info")[1]["worker_pids"]
    with ThreadPoolExecutor(1) as pool:
        frozen = pool.submit(_generate, url, 1, LONG)
        wait_until(lambda: _loads(url)[1]["num_reqs"] == 1, 30, "the request to run on rank 1")
        os.kill(worker_pids[1], signal.SIGSTOP)
        try:
            status, answer = frozen.result(30)
            assert status == 503, answer
            assert "dp worker 1 is not responding" in answer["error"]["message"], answer
            status, health = http_json("GET", f"{url}/health")
            assert status == 503 and "dp worker 1" in health["error"]["message"], health
            status, refused = _generate(url, rank=1)
            assert status == 503 and "not responding" in refused["error"]["message"], refused
            for _ in range(2):  # round robin: both go to the worker that runs
                assert _generate(url)[0] == 200
        finally:
            os.kill(worker_pids[1], signal.SIGCONT)
    # The abort queued for the stopped worker freed the long request once it ran again.
    wait_healthy_and_idle(url)
    assert _generate(url, rank=1)[0] == 200


def test_a_whole_server_stopped_and_resumed_blames_no_worker(server_factory):
    """Front end and workers stopped together past the timeouts: on resuming, the front end
    must not read its own pause as its workers' silence, nor as a stall of their loops (a
    worker may beat before its loop turns: a watchdog as tiny as 0.5 s, which a live loop
    never trips)."""
    args = ["--dp-size", "2", "--worker-heartbeat-timeout-s", str(TIMEOUT_S)]
    server = server_factory([*TINY_ARGS, *args, "--watchdog-timeout", "0.5"])
    url = server.url
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_generate, url, 1, {"max_new_tokens": 400, "ignore_eos": True})
        wait_until(lambda: _loads(url)[1]["num_reqs"] == 1, 30, "the request to run on rank 1")
        os.killpg(server.pid, signal.SIGSTOP)
        try:
            # Not a synchronisation: the test is the pause itself, past the timeout.
            until = time.monotonic() + 2 * TIMEOUT_S
            wait_until(lambda: time.monotonic() > until, 10, "the pause")
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        status, answer = running.result(60)
    assert status == 200, answer
    assert http_json("GET", f"{url}/health")[0] == 200
