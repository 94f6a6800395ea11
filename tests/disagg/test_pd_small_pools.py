"""Prefill and decode with KV pools of a few requests each, under more concurrent PD
requests than either holds: prefill computes only what decode can take (no room holds
prefill pages while its decode waits for pages held by rooms prefill cannot compute), so
every request completes with the colocated server's tokens, and both pools end empty."""

from __future__ import annotations

import random

import requests

from tests.disagg.pd_driver import pd_generate_async, run_many, wait_idle

PAGE = 16
PREFILL_POOL_PAGES = 12
DECODE_POOL_PAGES = 7
NUM_REQUESTS = 24
# Far more than the whole run needs once served in order, short enough that a room blocked
# on the other side's pool (the failure this tests) ends in a 504 within the test.
BOOTSTRAP_TIMEOUT_S = 5
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


def test_tiny_pools_on_both_sides_serve_every_request(pd, tiny_server):
    bodies = _bodies()
    want = []
    for body in bodies:
        answer = requests.post(tiny_server.url + "/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        want.append(answer.json()["output_ids"])
    common = [
        "--bootstrap-timeout-s",
        str(BOOTSTRAP_TIMEOUT_S),
        "--context-length",
        str(CONTEXT_LEN),
    ]
    prefill = pd.prefill(1, ["--max-total-tokens", str(PREFILL_POOL_PAGES * PAGE), *common])
    decode = pd.decode(1, ["--max-total-tokens", str(DECODE_POOL_PAGES * PAGE), *common])
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
