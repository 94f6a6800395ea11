"""Prefill and decode with KV pools of different sizes: each side refuses only what it
cannot hold itself. Prefill holds a prompt's pages only (decode holds the answer's), so a
prompt that fits prefill's pool is served whatever its max_new_tokens, when decode's pool
takes prompt and answer; one that does not fit is refused at once on both legs. A chat's
default max_tokens is likewise decode's."""

from __future__ import annotations

import random

import pytest
import requests

from tests.disagg.pd_driver import pd_generate, wait_idle

PAGE = 16
PREFILL_POOL_PAGES = 4


@pytest.fixture(scope="module")
def pair(pd_module):
    prefill = pd_module.prefill(1, ["--max-total-tokens", str(PREFILL_POOL_PAGES * PAGE)])
    decode = pd_module.decode(1, ["--max-total-tokens", str(16 * PAGE)])
    return prefill, decode


def _body(prompt_len: int, max_new_tokens: int) -> dict:
    rng = random.Random(prompt_len)
    return {
        "input_ids": [rng.randrange(3, 250) for _ in range(prompt_len)],
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }


def test_a_prompt_that_fits_prefills_pool_is_served_past_it_by_decode(pair, tiny_server):
    prefill, decode = pair
    # 50 + 30 tokens need 5 pages: more than prefill's 4, which holds the prompt's 4 only.
    body = _body(PREFILL_POOL_PAGES * PAGE - 14, 30)
    result = pd_generate(prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port)
    assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
    expected = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    assert result.decode.body["output_ids"] == expected["output_ids"]
    wait_idle([prefill.url, decode.url])


def test_a_prompt_past_prefills_pool_is_refused_on_both_legs_naming_the_prompt(pair):
    prefill, decode = pair
    body = _body(PREFILL_POOL_PAGES * PAGE + 1, 4)
    result = pd_generate(prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port)
    assert (result.prefill.status, result.decode.status) == (400, 400)
    for leg in (result.prefill, result.decode):
        assert f"prompt = {PREFILL_POOL_PAGES * PAGE + 1} tokens" in leg.error, leg.error
    wait_idle([prefill.url, decode.url])


def test_a_chat_without_max_tokens_takes_decodes_limit_not_prefills(pair):
    """Its default max_tokens is the rest of the context or pool; prefill's pool holds the
    prompt only, so prefill's default must not refuse min_tokens that decode's allows."""
    prefill, decode = pair
    body = {"messages": [{"role": "user", "content": "hi"}], "min_tokens": 60, "temperature": 0}
    result = pd_generate(
        prefill.url,
        decode.url,
        body,
        bootstrap_port=prefill.bootstrap_port,
        path="/v1/chat/completions",
    )
    assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
    usage = result.decode.body["usage"]
    assert usage["prompt_tokens"] + 60 > PREFILL_POOL_PAGES * PAGE  # past prefill's pool
    assert usage["completion_tokens"] >= 60
    wait_idle([prefill.url, decode.url])
