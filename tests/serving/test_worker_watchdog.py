"""A worker whose loop stops turning while its heartbeat thread still beats (here: one
unchunked prefill far longer than a tiny --watchdog-timeout): its requests fail with a 503
naming it and the stall, new requests avoid it, /health answers 503 and its stacks go to the
log, until the loop turns again. It used to pass /health while its requests waited for their
deadlines. An idle worker is never stuck. Real server processes."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import http_json, launch_server, wait_healthy_and_idle, wait_until

# One step of this prompt (one unchunked prefill) takes seconds on tiny-random (about 6 s
# on a CPU core), far past the watchdog: the stall is real computation, not a mock.
LONG_PROMPT_LEN = 8000
LONG_ARGS = [
    "--context-length", "8192", "--chunked-prefill-size", "8192", "--watchdog-timeout", "0.5",
]  # fmt: skip
SHORT = {"max_new_tokens": 4, "temperature": 0.0}


def long_prompt() -> list[int]:
    rng = random.Random(0)  # no prefix-cache hit can shorten the step: a fresh server
    return [rng.randrange(3, 500) for _ in range(LONG_PROMPT_LEN)]


def _generate(url: str, body: dict, rank: int | None = None) -> tuple[int, dict]:
    if rank is not None:
        body = {**body, "routed_dp_rank": rank}
    return http_json("POST", f"{url}/generate", body, 300)


def _short(url: str, rank: int | None = None) -> tuple[int, dict]:
    return _generate(url, {"text": "hello", "sampling_params": SHORT}, rank)


@pytest.fixture
def dp2_server():
    with launch_server([*TINY_ARGS, "--dp-size", "2", *LONG_ARGS]) as server:
        yield server


def test_a_worker_stuck_in_one_step_fails_its_requests_until_its_loop_turns(dp2_server):
    url = dp2_server.url
    # Idle first, past several beats and timeouts: an idle worker is never stuck. (Not a
    # synchronisation: the idle time is what is tested.)
    until = time.monotonic() + 3
    wait_until(lambda: time.monotonic() > until, 10, "the idle time")
    assert http_json("GET", f"{url}/health")[0] == 200 and _short(url)[0] == 200
    assert "no progress" not in dp2_server.output()
    body = {"input_ids": long_prompt(), "sampling_params": {"max_new_tokens": 1}}
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(_generate, url, body, 1)
        status, answer = stuck.result(120)
        # Asked while the step runs on: it ends about 6 s after it began, the 503 about 2 s.
        health_status, health = http_json("GET", f"{url}/health")
        refused_status, refused = _short(url, rank=1)
        others = [_short(url)[0] for _ in range(2)]  # round robin: both to the worker that runs
    message = answer["error"]["message"]
    assert status == 503 and "dp worker 1 is not responding" in message, answer
    assert "no progress for" in message and "--watchdog-timeout 0.5" in message, answer
    assert health_status == 503 and "no progress" in health["error"]["message"], health
    assert refused_status == 503 and "no progress" in refused["error"]["message"], refused
    assert others == [200, 200]
    wait_healthy_and_idle(url, health_timeout_s=120)
    assert _short(url, rank=1)[0] == 200
    log = dp2_server.output()
    assert "worker 1 (pid" in log and "its stacks follow" in log, dp2_server.output_tail()
    # faulthandler's dump: the worker's loop, caught in its step.
    assert 'engine/engine.py", line' in log and " in step\n" in log, log[-6000:]
