"""Decode preemption seen from outside: a server whose KV pool holds fewer pages than its
running requests need preempts some, and /metrics counts them per DP rank."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import TINY_ARGS
from tests.helpers import http_json, wait_until

PAGE = 16
POOL_PAGES = 8
# 20 prompt + 80 output tokens: 7 pages each, so two running requests outgrow the pool.
BODIES = [
    {
        "input_ids": [10 + (i * 13 + shift) % 450 for i in range(20)],
        "sampling_params": {"max_new_tokens": 80, "temperature": 0.0, "ignore_eos": True},
    }
    for shift in range(4)
]
METRIC = 'pdserve_num_preemptions_total{dp_rank="0",model_name="tiny-random"}'


def preemptions(url: str) -> float | None:
    text = http_json("GET", f"{url}/metrics")[1]
    for line in text.splitlines():
        if line.startswith(METRIC + " "):
            return float(line.split()[-1])
    return None


def test_decode_preemptions_are_counted_on_metrics(server_factory):
    server = server_factory([*TINY_ARGS, "--max-total-tokens", str(POOL_PAGES * PAGE)])
    with ThreadPoolExecutor(len(BODIES)) as pool:
        futures = [pool.submit(http_json, "POST", f"{server.url}/generate", b) for b in BODIES]
        answers = [f.result(120) for f in futures]
    for status, answer in answers:
        assert status == 200, answer
        assert len(answer["output_ids"]) == 80
    # Lifetime counts reach the front end with the worker's next load report.
    wait_until(lambda: (preemptions(server.url) or 0) > 0, 30, f"{METRIC} > 0")
