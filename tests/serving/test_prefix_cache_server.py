"""The prefix cache through a real colocated server (dp 1 and dp 2): a repeated prompt
reports cached tokens in native and OpenAI answers with the same tokens, and only under the
same cache salt (`cache_salt`, `extra_key`); /flush_cache works
under load; kv_pages_used returns to 0 while cached pages stay, shown by /get_load and
/metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import http_json, launch_server, wait_until

PAGE = 16  # the server's default page size
PROMPT = [5 + (i * 11) % 300 for i in range(70)]  # 4 full pages + 6 tokens
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_new_tokens": 3000, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module", params=[1, 2], ids=["dp1", "dp2"])
def server(request, tiny_server):
    if request.param == 1:
        yield tiny_server
        return
    with launch_server([*TINY_ARGS, "--dp-size", "2"]) as dp2:
        yield dp2


def rank_load(url: str, rank: int) -> dict:
    return http_json("GET", f"{url}/get_load")[1][rank]


def metric_lines(url: str, prefix: str) -> list[str]:
    text = http_json("GET", f"{url}/metrics")[1]
    return [line for line in text.splitlines() if line.startswith(prefix)]


def server_rank(server) -> int:
    """The last rank: with dp 2, rank 1, so routing by rank is exercised too."""
    return len(http_json("GET", f"{server.url}/get_load")[1]) - 1


def flush_and_wait(url: str, rank: int) -> None:
    assert http_json("POST", f"{url}/flush_cache")[0] == 200
    wait_until(lambda: rank_load(url, rank)["num_cached_pages"] == 0, 30, "the cache to empty")


def test_a_repeated_prompt_reports_cached_tokens_with_the_same_tokens(server):
    url, rank = server.url, server_rank(server)
    flush_and_wait(url, rank)
    body = {"input_ids": PROMPT, "sampling_params": GREEDY, "routed_dp_rank": rank}
    first = http_json("POST", f"{url}/generate", body)[1]
    second = http_json("POST", f"{url}/generate", body)[1]
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 4 * PAGE
    assert second["output_ids"] == first["output_ids"]
    completion = {"model": "tiny-random", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
    status, out = http_json(
        "POST", f"{url}/v1/completions", {**completion, "ignore_eos": True, "routed_dp_rank": rank}
    )
    assert status == 200, out
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * PAGE
    assert out["usage"]["prompt_tokens"] == len(PROMPT)
    # n samples share their prompt: it counts once, and so do its cached tokens
    status, out = http_json(
        "POST", f"{url}/v1/completions", {**completion, "n": 3, "routed_dp_rank": rank}
    )
    assert status == 200, out
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * PAGE
    assert out["usage"]["prompt_tokens"] == len(PROMPT)


def test_a_salted_prompt_shares_cached_pages_only_under_its_salt(server):
    """vLLM's cache_salt and SGLang's extra_key (one salt by either name) keep tenants
    apart: no prefix hit across salts, the usual hit within one, the same tokens."""
    url, rank = server.url, server_rank(server)
    flush_and_wait(url, rank)
    body = {"input_ids": PROMPT, "sampling_params": GREEDY, "routed_dp_rank": rank}
    completion = {"model": "tiny-random", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
    completion |= {"ignore_eos": True, "routed_dp_rank": rank}

    def generate(**salt) -> tuple[int, list[int]]:
        status, out = http_json("POST", f"{url}/generate", {**body, **salt})
        assert status == 200, out
        return out["meta_info"]["cached_tokens"], out["output_ids"]

    def complete(**salt) -> tuple[int, str]:
        status, out = http_json("POST", f"{url}/v1/completions", {**completion, **salt})
        assert status == 200, out
        return out["usage"]["prompt_tokens_details"]["cached_tokens"], out["choices"][0]["text"]

    num_cached, tokens = generate()
    assert num_cached == 0
    assert generate(extra_key="tenant-a") == (0, tokens)
    num_cached, text = complete(cache_salt="tenant-a")
    assert num_cached == 4 * PAGE  # tenant-a's pages, named by the other field
    assert complete(cache_salt="tenant-b") == (0, text)
    assert generate(cache_salt="tenant-a", extra_key="k") == (0, tokens)  # a third salt
    assert generate(cache_salt="tenant-a\x00k") == (0, tokens)  # and a fourth
    assert generate(cache_salt="tenant-b") == (4 * PAGE, tokens)
    assert generate() == (4 * PAGE, tokens)  # the unsalted pages stayed unsalted
    # A MiB salt on a batch (each sequence once carried it whole to the workers): its
    # key isolates it like any salt.
    long_salt = "tenant-c/" + "s" * 2**20
    batch = {**body, "input_ids": [PROMPT, PROMPT], "cache_salt": long_salt}
    status, outs = http_json("POST", f"{url}/generate", batch)
    assert status == 200, outs
    assert [out["output_ids"] for out in outs] == [tokens, tokens]
    assert generate(cache_salt=long_salt) == (4 * PAGE, tokens)


def test_flush_under_load_keeps_pinned_pages_and_pages_used_returns_to_zero(server):
    url, rank = server.url, server_rank(server)
    flush_and_wait(url, rank)
    body = {"input_ids": PROMPT, "sampling_params": GREEDY, "routed_dp_rank": rank}
    assert http_json("POST", f"{url}/generate", body)[0] == 200

    def cached_and_idle() -> bool:
        load = rank_load(url, rank)
        return load["num_cached_pages"] == 4 and load["num_running_reqs"] == 0

    # A load report from after that request: a report of one running request after it can
    # only be the long one's. (Reports come periodically: one taken while the first request
    # ran, its pages already cached, let the flush go before the long request was admitted.)
    wait_until(cached_and_idle, 30, "4 cached pages, nothing running")
    with ThreadPoolExecutor(1) as pool:
        long_body = {**body, "rid": f"pinning-{rank}", "sampling_params": LONG}
        future = pool.submit(http_json, "POST", f"{url}/generate", long_body)
        wait_until(lambda: rank_load(url, rank)["num_running_reqs"] == 1, 30, "the long request")
        assert http_json("POST", f"{url}/flush_cache")[0] == 200  # no refusal while it runs
        # The worker takes the flush before this request: the pinned prefix survived it.
        again = http_json("POST", f"{url}/generate", body)[1]
        assert again["meta_info"]["cached_tokens"] == 4 * PAGE
        assert rank_load(url, rank)["num_used_pages"] > 0
        http_json("POST", f"{url}/abort_request", {"rid": f"pinning-{rank}"})
        status, answer = future.result(60)
    assert status == 200 and answer["meta_info"]["cached_tokens"] == 4 * PAGE

    def idle_with_cache() -> bool:
        load = rank_load(url, rank)
        return load["num_used_pages"] == 0 and load["num_reqs"] == 0 and load["num_cached_pages"]

    wait_until(idle_with_cache, 30, "no page used, some cached")
    load = rank_load(url, rank)
    # The aborted answer's computed pages joined the prompt's.
    assert load["num_cached_pages"] > 4
    assert load["num_cached_tokens"] == load["num_cached_pages"] * PAGE
    assert load["num_evictable_pages"] == load["num_cached_pages"]
    assert load["num_free_pages"] == load["num_total_pages"]
    label = f'{{dp_rank="{rank}",model_name="tiny-random"}}'
    assert metric_lines(url, f"pdserve_kv_pages_used{label} 0.0")
    assert metric_lines(url, f"pdserve_kv_pages_cached{label}")
    hits = metric_lines(url, f"pdserve_prefix_cache_hit_tokens_total{label}")
    assert float(hits[0].split()[-1]) >= 4 * PAGE
    assert metric_lines(url, f"pdserve_prefix_cache_hit_rate{label}")
    flush_and_wait(url, rank)


def test_a_flush_answered_is_done_and_get_load_shows_it(server):
    """/flush_cache answers once every worker flushed and reported it: /get_load right after
    shows no cached page (it used to answer at once, and the load showed the old cache)."""
    url, rank = server.url, server_rank(server)
    for i in range(5):
        ids = [7 + i] + PROMPT[1:]
        body = {"input_ids": ids, "sampling_params": GREEDY, "routed_dp_rank": rank}
        assert http_json("POST", f"{url}/generate", body)[0] == 200
        wait_until(lambda: rank_load(url, rank)["num_cached_pages"] > 0, 30, "cached pages")
        assert http_json("POST", f"{url}/flush_cache")[0] == 200
        assert [load["num_cached_pages"] for load in http_json("GET", f"{url}/get_load")[1]] == [
            0
        ] * (rank + 1), f"round {i}"
