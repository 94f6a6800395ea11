"""Delta transfer through real prefill and decode servers (tiny-random): decode reuses the
prompt pages it holds, prefill ships only the rest, and the tokens equal those of a server
with the prefix cache off, for conversations, shared prefixes and prompts decode holds all
but the last page of."""

from __future__ import annotations

import random

import pytest
import requests

from tests.conftest import TINY_ARGS
from tests.disagg.conftest import NIXL, backend_args
from tests.disagg.pd_driver import (
    check_delta_conversation,
    metric_value,
    pd_generate,
    pd_generate_async,
    run_many,
    wait_idle,
)
from tests.helpers import launch_server

PAGE = 16  # the servers' default --page-size


def _pages(num_tokens: int) -> int:
    return -(-num_tokens // PAGE)


def _body(ids: list[int], max_new_tokens: int = 6, seed: int | None = None) -> dict:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    if seed is not None:
        sampling.update(temperature=0.9, top_p=0.95, seed=seed)
    return {"input_ids": ids, "sampling_params": sampling}


@pytest.fixture(scope="module")
def cache_off():
    """The reference: a colocated server without a prefix cache."""
    with launch_server([*TINY_ARGS, "--disable-radix-cache"]) as server:
        yield server


def _reference(server, body: dict) -> list[int]:
    resp = requests.post(server.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


@pytest.fixture(scope="module")
def pair(pd_module):
    prefill = pd_module.prefill(1)
    # A long share wait: under a loaded machine the rooms below still wait for each other.
    decode = pd_module.decode(1, ["--kv-share-wait-s", "60"])
    return prefill, decode


def _pd(pair, body: dict):
    prefill, decode = pair
    result = pd_generate(prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port)
    assert result.prefill.ok, result.prefill.error
    assert result.decode.ok, result.decode.error
    return result.prefill.body["meta_info"], result.decode.body


def _flush(url: str) -> None:
    assert requests.post(url + "/flush_cache", timeout=10).status_code == 200


def test_a_conversation_moves_only_the_new_pages_with_the_tokens_of_no_cache(pair, cache_off):
    prefill, decode = pair
    check_delta_conversation(
        prefill.url, decode.url, prefill.bootstrap_port, lambda b: _reference(cache_off, b)
    )


@pytest.mark.parametrize("backend", [NIXL])
def test_nixl_moves_the_same_delta_with_the_tokens_of_no_cache(pd, cache_off, backend):
    """Decode reads only the pages past what it holds, into the pages it granted; under a
    disagg secret, whose proof covers the NIXL metadata in the handshake."""
    args = [*backend_args(backend), "--disagg-secret", "delta-secret"]
    prefill = pd.prefill(1, args)
    decode = pd.decode(1, args)
    check_delta_conversation(
        prefill.url, decode.url, prefill.bootstrap_port, lambda b: _reference(cache_off, b)
    )


def test_the_fake_backend_asks_for_the_same_delta(pd):
    """No bytes move (the tokens are those of zero KV), but the page lists and the checks
    on both sides are the zmq backend's."""
    args = ["--transfer-backend", "fake"]
    prefill = pd.prefill(1, args)
    decode = pd.decode(1, args)
    check_delta_conversation(prefill.url, decode.url, prefill.bootstrap_port, moves_bytes=False)


@pytest.mark.parametrize("length", [3 * PAGE, 3 * PAGE + 1, 3 * PAGE + 7])
def test_decode_holding_all_but_the_last_page_gets_the_right_first_token(pair, cache_off, length):
    prefill, decode = pair
    rng = random.Random(length)
    prompt = [rng.randrange(3, 250) for _ in range(length)]
    body = _body(prompt, max_new_tokens=4)
    reference = _reference(cache_off, body)
    _, first = _pd(pair, body)
    assert first["output_ids"] == reference
    # Prefill forgets the prompt, decode keeps it: prefill recomputes every token and
    # sends only the last page (decode matches at most prompt length - 1 tokens).
    _flush(prefill.url)
    prefill_meta, again = _pd(pair, body)
    assert again["output_ids"] == reference
    assert prefill_meta["cached_tokens"] == 0
    assert again["meta_info"]["decode_cached_tokens"] == (length - 1) // PAGE * PAGE
    num_sent_pages = _pages(length) - (length - 1) // PAGE
    assert again["meta_info"]["kv_transfer_bytes"] * _pages(length) == (
        first["meta_info"]["kv_transfer_bytes"] * num_sent_pages
    )
    wait_idle([prefill.url, decode.url])


def _shared_prefix_bodies(seed: int) -> list[dict]:
    """Prompts sharing 0, 1 and many pages and a partial page with a base prompt (and
    with each other), greedy and seeded."""
    rng = random.Random(seed)
    base = [rng.randrange(3, 250) for _ in range(8 * PAGE)]

    def tail(n: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(n)]

    prompts = [
        base,
        [251] + base[1:],  # shares nothing
        base[:PAGE] + tail(20),  # one page
        base[: 6 * PAGE] + tail(PAGE + 3),  # many pages
        base[: 6 * PAGE + 7] + tail(12),  # many pages and part of the next
        base[: 3 * PAGE],  # a whole-page prompt decode holds all of but its last page
    ]
    bodies = [_body(p) for p in prompts]
    bodies += [_body(p, seed=1000 + i) for i, p in enumerate(prompts)]
    return bodies


def _run_all(prefill, decode, bodies: list[dict], concurrent: bool) -> list[dict]:
    def one(session, body):
        return pd_generate_async(
            session, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port
        )

    if concurrent:
        results = run_many(lambda s: [one(s, b) for b in bodies])
    else:
        results = [run_many(lambda s, b=b: [one(s, b)])[0] for b in bodies]
    for r in results:
        assert r.prefill.ok and r.decode.ok, (r.prefill.error, r.decode.error)
    return [r.decode.body for r in results]


@pytest.mark.parametrize("dp", [1, 2])
def test_shared_prefixes_give_the_tokens_of_no_cache(pd, pair, cache_off, dp):
    """DP 1 runs on the module's pair: these prompts are this test's own, and the skipped
    tokens are counted from what the counter read before."""
    prefill, decode = pair if dp == 1 else (pd.prefill(dp), pd.decode(dp))
    skipped = "pdserve_kv_transfer_skipped_tokens_total"
    skipped_before = metric_value(decode.url, skipped)
    bodies = _shared_prefix_bodies(seed=dp)
    reference = [_reference(cache_off, b) for b in bodies]
    # Twice in order (the second round finds everything cached on both sides), then all
    # at once (hits on pages other rooms are still receiving or have just pinned).
    for round_ in range(2):
        answers = _run_all(prefill, decode, bodies, concurrent=False)
        assert [a["output_ids"] for a in answers] == reference, f"round {round_}"
    assert sum(a["meta_info"]["decode_cached_tokens"] for a in answers) > 0
    answers = _run_all(prefill, decode, bodies, concurrent=True)
    assert [a["output_ids"] for a in answers] == reference
    assert metric_value(decode.url, skipped) > skipped_before
    wait_idle([prefill.url, decode.url])


def test_a_decode_pool_smaller_than_the_working_set_evicts_and_answers(pd, pair, cache_off):
    """A decode of its own, with the module's prefill (these prompts are this test's own)."""
    prefill = pair[0]
    decode = pd.decode(1, ["--max-total-tokens", str(24 * PAGE)])
    rng = random.Random(3)
    system = [rng.randrange(3, 250) for _ in range(4 * PAGE)]
    prompts = [system + [rng.randrange(3, 250) for _ in range(5 * PAGE + i)] for i in range(8)]
    bodies = [_body(p) for p in prompts] * 2
    reference = [_reference(cache_off, b) for b in bodies]
    for concurrent in (False, True):
        answers = _run_all(prefill, decode, bodies, concurrent)
        assert [a["output_ids"] for a in answers] == reference
    assert metric_value(decode.url, "pdserve_prefix_cache_evicted_pages_total") > 0
    wait_idle([prefill.url, decode.url])


def test_rooms_arriving_together_take_a_shared_prefix_from_the_first_ones_kv(pair, cache_off):
    """Four prompts behind one system prompt at once (the first turns of four chats):
    the first room's KV brings the system prompt; the others wait for it to land and
    reserve past it, so it crosses the wire once."""
    prefill, decode = pair
    rng = random.Random(11)
    system = [rng.randrange(3, 250) for _ in range(4 * PAGE)]
    bodies = [_body(system + [rng.randrange(3, 250) for _ in range(5 + i)]) for i in range(4)]
    reference = [_reference(cache_off, b) for b in bodies]
    answers = _run_all(prefill, decode, bodies, concurrent=True)
    assert [a["output_ids"] for a in answers] == reference
    held = sorted(a["meta_info"]["decode_cached_tokens"] for a in answers)
    assert held == [0] + [4 * PAGE] * 3
    wait_idle([prefill.url, decode.url])


def test_legs_with_other_prompts_of_one_length_move_no_kv_into_decodes_cache(pair, cache_off):
    """Decode caches the KV it receives under the page hashes of its own prompt: legs of one
    room carrying different prompts of the same length must fail, or that KV would answer a
    later, well-formed request for decode's prompt with wrong tokens."""
    prefill, decode = pair
    rng = random.Random(17)
    decode_prompt = [rng.randrange(3, 250) for _ in range(4 * PAGE)]
    prefill_prompt = [rng.randrange(3, 250) for _ in range(4 * PAGE)]
    result = pd_generate(
        prefill.url,
        decode.url,
        _body(decode_prompt),
        bootstrap_port=prefill.bootstrap_port,
        prefill_extra={"input_ids": prefill_prompt},
    )
    for leg in (result.prefill, result.decode):
        assert leg.status == 500, leg.body
        assert "both legs of a room must carry the same prompt" in leg.error
    body = _body(decode_prompt + [7, 8, 9])
    _, answer = _pd(pair, body)
    assert answer["output_ids"] == _reference(cache_off, body)
    wait_idle([prefill.url, decode.url])


def test_a_salted_prompt_reuses_pages_only_under_its_salt_on_both_legs(pair, cache_off):
    """cache_salt / extra_key (one salt by either name): after the same prompt under another
    salt, prefill computes all of it and decode, which counts only its salt's pages in what
    it holds, receives all of it; under the same salt, the usual delta. Tokens as no cache."""
    prefill, decode = pair
    rng = random.Random(23)
    body = _body([rng.randrange(3, 250) for _ in range(4 * PAGE + 5)])  # 5 pages, 4 full
    reference = _reference(cache_off, body)

    def run(**salt) -> tuple[int, int, int]:
        """(prefill's cached tokens, decode's, KV bytes sent)"""
        prefill_meta, answer = _pd(pair, {**body, **salt})
        assert answer["output_ids"] == reference
        meta = answer["meta_info"]
        return (
            prefill_meta["cached_tokens"],
            meta["decode_cached_tokens"],
            meta["kv_transfer_bytes"],
        )

    *held, full_nbytes = run()
    assert held == [0, 0] and full_nbytes > 0
    assert run(cache_salt="tenant-a") == (0, 0, full_nbytes)
    assert run(cache_salt="tenant-b") == (0, 0, full_nbytes)
    # the last page alone
    assert run(extra_key="tenant-a") == (4 * PAGE, 4 * PAGE, full_nbytes // 5)
    wait_idle([prefill.url, decode.url])
