"""kv_aware's pure core: the candidate holding the prompt's prefix wins unless its load
outweighs the tokens it saves; with --dp-aware the rank holding it is named; workers with
no events and text prompts are scored by load alone; a salted prompt matches only pages
cached under its salt."""

import pytest

from pdserve.engine.page_hash import page_hashes, salted_seed
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_policy import KVAware, output_budget
from tests.router.test_policy import make_workers

PAGE, SEED = 16, 1234
PROMPT = list(range(100, 180))  # 80 tokens: 4 pages matchable (the last token is computed)


def index_with(url: str, rank: int, num_pages: int, dp_size: int = 2) -> KVIndex:
    index = KVIndex()
    cache = index.track(url, PAGE, SEED)
    ranks = [[] for _ in range(dp_size)]
    ranks[rank] = page_hashes(PROMPT, PAGE, SEED)[:num_pages]
    cache.load_snapshot({"seq": 1, "ranks": ranks})
    return index


def test_the_worker_holding_the_prefix_wins_and_load_can_outweigh_it():
    a, b = make_workers(2)
    index = index_with(b.url, rank=1, num_pages=4)
    policy = KVAware(index, per_rank=False)
    best = policy.score([a, b], PROMPT)
    assert (best.worker, best.dp_rank, best.matched_tokens) == (b, None, 64)
    b.on_dispatch(0.0, 100, None)  # 100 tokens in flight cost more than the 64 it saves
    assert policy.choose([a, b], PROMPT) is a


def test_dp_aware_names_the_rank_that_holds_the_prefix():
    a, b = make_workers(2)
    for w in (a, b):
        w.set_dp_size(2)
    index = index_with(a.url, rank=1, num_pages=3)
    policy = KVAware(index, per_rank=True)
    best = policy.score([b, a], PROMPT)
    assert (best.worker, best.dp_rank, best.matched_tokens) == (a, 1, 48)
    a.on_dispatch(0.0, 50, 1)  # the rank is busy: its 32 tokens to compute + 50 > 80
    assert policy.score([b, a], PROMPT).matched_tokens == 0  # an idle rank, whichever
    a.on_done(0.0, True, 1, 50)
    assert policy.score([b, a], PROMPT).dp_rank == 1


def test_a_prefill_rank_busy_with_cached_prompts_keeps_the_conversation():
    """A prefill leg in flight loads its rank with the tokens it computes, not its prompt:
    a rank computing another conversation's short new turn still wins the prompt whose
    history it holds (counting that turn's whole 64-token prompt would send it away)."""
    (a,) = make_workers(1)
    a.set_dp_size(2)
    index = index_with(a.url, rank=1, num_pages=4)  # rank 1 holds 64 of the 80 tokens
    policy = KVAware(index, per_rank=True)
    a.on_dispatch(0.0, prompt_tokens=64, rank=1, leg_tokens=16)  # 48 of its 64 were cached
    best = policy.score([a], PROMPT)  # rank 1: 16 + 16 to compute; rank 0: 80
    assert (best.dp_rank, best.matched_tokens) == (1, 64)
    a.on_done(0.0, True, 1, leg_tokens=16)
    a.on_dispatch(0.0, prompt_tokens=80, rank=1)  # a whole prompt in flight: 16 + 80 > 80
    assert policy.score([a], PROMPT).dp_rank == 0


def test_unindexed_workers_and_text_prompts_go_by_load():
    a, b = make_workers(2)
    a.on_dispatch(0.0, 50, None)
    policy = KVAware(KVIndex(), per_rank=False)
    assert policy.choose([a, b], PROMPT) is b
    index = index_with(a.url, rank=0, num_pages=4)
    assert KVAware(index, per_rank=False).choose([a, b], "some text") is b


def test_a_forgotten_worker_has_no_match():
    a, b = make_workers(2)
    index = index_with(a.url, rank=0, num_pages=4)
    policy = KVAware(index, per_rank=False)
    policy.forget(a.url)
    assert policy.score([a, b], PROMPT).matched_tokens == 0


def test_equal_candidates_take_turns():
    workers = make_workers(3)
    policy = KVAware(KVIndex(), per_rank=False)
    assert {policy.choose(workers, PROMPT).url for _ in range(3)} == {w.url for w in workers}


def test_a_decode_leg_loads_its_rank_with_the_tokens_it_may_generate():
    """The decode rank that holds a shared system prompt does not draw every request
    behind it: each decode in flight there counts its answer's budget."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 64}}
    assert output_budget(body) == 64
    assert output_budget({"messages": [], "max_tokens": 7, "max_completion_tokens": 9}) == 9
    assert output_budget({"prompt": "x", "max_tokens": 0}) == 0
    assert output_budget({"prompt": "x", "max_tokens": True}) == 128  # the servers' default
    (d,) = make_workers(1)
    d.set_dp_size(2)
    policy = KVAware(index_with(d.url, rank=1, num_pages=4), per_rank=True)
    d.on_dispatch(0.0, prompt_tokens=80, rank=1, leg_tokens=16)  # received 16 of 80
    assert policy.score([d], PROMPT).dp_rank == 1  # 16 + 16 to receive < 80
    d.on_done(0.0, True, 1, leg_tokens=16)
    d.on_dispatch(0.0, prompt_tokens=80, rank=1, leg_tokens=16 + output_budget(body))
    assert policy.score([d], PROMPT).dp_rank == 0  # 16 + 80 > 80 on the idle rank


def test_ids_that_are_not_token_ids_go_by_load_for_the_server_to_refuse():
    a, b = make_workers(2)
    a.on_dispatch(0.0, 50, None)
    index = index_with(a.url, rank=0, num_pages=4)
    policy = KVAware(index, per_rank=True)
    for bad in ("x", None, 2**70, [1]):
        prompt = [*PROMPT[:20], bad, *PROMPT[21:]]
        best = policy.score([a, b], prompt)
        assert (best.worker, best.matched_tokens) == (b, 0), bad


def test_a_salted_prompt_matches_only_pages_cached_under_its_salt():
    """The servers hash a salted request's pages from its salted seed; scored with the
    unsalted hashes, kv_aware sent a tenant's prompt to the worker holding another's."""
    a, b = make_workers(2)
    index = KVIndex()
    for worker, salt in ((a, None), (b, "tenant-b")):
        hashes = page_hashes(PROMPT, PAGE, salted_seed(SEED, salt))[:4]
        index.track(worker.url, PAGE, SEED).load_snapshot({"seq": 1, "ranks": [hashes]})
    policy = KVAware(index, per_rank=False)
    for salt, holder in ((None, a), ("tenant-b", b)):
        for order in ([a, b], [b, a]):
            best = policy.score(order, PROMPT, salt)
            assert (best.worker, best.matched_tokens) == (holder, 64), salt
    assert policy.score([a, b], PROMPT, "tenant-c").matched_tokens == 0


def test_without_dp_aware_the_least_loaded_rank_holding_the_prompt_is_named():
    """Local prefill names the rank that holds the prompt; where several hold all of it,
    the least loaded one (the first was named every time: one rank took every request)."""
    (a,) = make_workers(1)
    a.set_dp_size(3)
    index = KVIndex()
    hashes = page_hashes(PROMPT, PAGE, SEED)
    index.track(a.url, PAGE, SEED).load_snapshot({"seq": 1, "ranks": [hashes, hashes[:2], hashes]})
    policy = KVAware(index, per_rank=False)
    best = policy.score([a], PROMPT)
    assert (best.matched_tokens, best.holding_rank) == (64, 0)
    a.on_dispatch(0.0, 80, 0, 40)
    assert policy.score([a], PROMPT).holding_rank == 2
    a.on_dispatch(0.0, 80, 2, 50)
    assert policy.score([a], PROMPT).holding_rank == 0  # rank 1 holds less


def test_an_event_of_a_negative_rank_is_malformed_and_names_no_rank():
    """A server's events are not the router's to trust: a `stored` of dp_rank -1 was
    applied, and that rank, holding the prompt, was named to decode for a local prefill
    (routed_dp_rank -1: every such request answered 400)."""
    (a,) = make_workers(1)
    index = index_with(a.url, rank=0, num_pages=0, dp_size=1)
    stored = {"type": "stored", "dp_rank": -1, "parent_hash": None, "num_tokens": 4 * PAGE}
    stored["page_hashes"] = page_hashes(PROMPT, PAGE, SEED)[:4]
    with pytest.raises(ValueError):  # malformed: the follower resynchronises from a snapshot
        index.workers[a.url].offer({"seq": 2, "events": [stored]})
    best = KVAware(index, per_rank=False).score([a], PROMPT)
    assert (best.holding_rank, best.matched_tokens) == (None, 0)
