"""Pure cores: worker choice policies, the prefix table, DP rank choice."""

import random

from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.policy import CacheAware, PowerOfTwo, RoundRobin
from pdserve.router.prefix_table import PrefixTable
from pdserve.router.workers import WorkerRegistry


def make_workers(n, config=None, role="prefill"):
    registry = WorkerRegistry(config or RouterConfig())
    workers = [
        registry.new_worker(WorkerSpec(f"http://127.0.0.1:{9000 + i}", role), healthy=True)
        for i in range(n)
    ]
    return workers


def test_round_robin_cycles_through_workers():
    workers = make_workers(3)
    policy = RoundRobin()
    assert [policy.choose(workers, None).url[-4:] for _ in range(6)] == [
        "9000",
        "9001",
        "9002",
        "9000",
        "9001",
        "9002",
    ]


def test_power_of_two_prefers_the_less_loaded_of_the_two_it_samples():
    a, b = make_workers(2)
    a.set_reported_load([500])
    b.set_reported_load([10, 20])
    policy = PowerOfTwo(random.Random(0))
    assert all(policy.choose([a, b], None) is b for _ in range(20))


def test_tokens_sent_since_the_last_report_count_as_load():
    a, b = make_workers(2)
    a.set_reported_load([100])
    b.set_reported_load([0])
    b.on_dispatch(0.0, prompt_tokens=300, rank=None)
    assert PowerOfTwo(random.Random(0)).choose([a, b], None) is a
    b.set_reported_load([0])  # the next report includes what was sent
    assert b.load() == 0


def test_workers_list_no_load_tokens_until_a_load_report_comes():
    """round_robin and random poll no /get_load: GET /workers showed every prompt token
    sent since start as the worker's load, growing forever."""
    (a,) = make_workers(1)
    a.on_dispatch(0.0, prompt_tokens=300, rank=None)
    a.on_done(1.0, True, rank=None)
    assert a.describe(2.0)["load_tokens"] is None
    a.set_reported_load([7, 5])
    a.on_dispatch(3.0, prompt_tokens=100, rank=None)
    assert a.describe(3.0)["load_tokens"] == 112


def test_cache_aware_sends_a_repeated_prefix_to_the_same_worker():
    config = RouterConfig(prefix_block_len=4, cache_threshold=0.5)
    workers = make_workers(3, config)
    policy = CacheAware(config)
    system = "You are a helpful assistant. " * 4
    first = policy.choose(workers, system + "What is 2+2?")
    for w in workers:  # even when the first worker looks a little busier
        w.set_reported_load([10 if w is first else 0])
    assert policy.choose(workers, system + "Tell me a joke.") is first


def test_cache_aware_balances_when_the_match_is_short():
    config = RouterConfig(prefix_block_len=4, cache_threshold=0.8)
    workers = make_workers(2, config)
    policy = CacheAware(config)
    first = policy.choose(workers, "shared-prefix" + "a" * 40)
    first.set_reported_load([50])
    chosen = policy.choose(workers, "shared-prefix" + "b" * 40)
    assert chosen is not first  # 12 of 53 characters matched: below the threshold


def test_cache_aware_ignores_prefixes_when_loads_are_skewed():
    config = RouterConfig(prefix_block_len=4, balance_abs_threshold=100, balance_rel_threshold=1.5)
    workers = make_workers(2, config)
    policy = CacheAware(config)
    prompt = "x" * 400
    first = policy.choose(workers, prompt)
    first.set_reported_load([1000])
    assert policy.choose(workers, prompt) is not first


def test_prefix_table_matches_longest_prefix_per_worker_and_stays_bounded():
    table = PrefixTable(block_len=2, max_blocks=8)
    table.insert([1, 2, 3, 4, 5, 6], "a")
    table.insert([1, 2, 3, 4, 9, 9], "b")
    assert table.match([1, 2, 3, 4, 5, 6, 7], ["a", "b", "c"]) == {"a": 6, "b": 4, "c": 0}
    for i in range(20):
        table.insert([100 + i, 0, 1, 1], "c")
    assert len(table) <= 8
    table.forget_worker("c")
    assert table.match([119, 0, 1, 1], ["c"]) == {"c": 0}


def test_prefix_table_evicts_leaves_before_the_shared_stem():
    table = PrefixTable(block_len=1, max_blocks=4)
    table.insert("abcd", "w")  # 4 blocks: a, ab, abc, abcd
    table.insert("ax", "w")  # one more block: the deepest old one (abcd) goes
    assert table.match("abcd", ["w"]) == {"w": 3}
    assert table.match("ax", ["w"]) == {"w": 2}


def test_rank_choice_spreads_over_ranks_and_avoids_busy_ones():
    (worker,) = make_workers(1)
    worker.set_dp_size(4)
    ranks = []
    for _ in range(4):
        rank = worker.choose_rank()
        worker.on_dispatch(0.0, 10, rank)
        ranks.append(rank)
    assert sorted(ranks) == [0, 1, 2, 3]
    worker.on_done(1.0, True, 2)
    assert worker.choose_rank() == 2  # the only rank with nothing in flight


def test_cache_aware_routes_ids_that_are_not_token_ids_by_load():
    config = RouterConfig(prefix_block_len=4)
    a, b = make_workers(2, config)
    a.on_dispatch(0.0, 50, None)
    policy = CacheAware(config)
    for bad in ([1, 2, [3], 4] * 20, [1, 2, {"x": 1}, 4] * 20):
        assert policy.choose([a, b], bad) is b


def test_a_new_dp_size_keeps_legs_in_flight_on_the_ranks_that_remain():
    (worker,) = make_workers(1)
    worker.set_dp_size(2)
    worker.on_dispatch(0.0, 10, rank=0)
    worker.on_dispatch(0.0, 20, rank=1)
    worker.set_reported_load([5, 5])
    worker.set_dp_size(3)  # the server came back with one more rank
    assert worker.in_flight_per_rank == [1, 1, 0]
    assert worker.tokens_in_flight_per_rank == [10, 20, 0]
    assert worker.reported_tokens == []  # a report of the old ranks
    assert worker.choose_rank() == 2
    worker.set_dp_size(1)
    assert worker.in_flight_per_rank == [1] and worker.tokens_in_flight_per_rank == [10]
    worker.on_done(1.0, True, rank=1, leg_tokens=20)  # a leg on a rank that is gone
    worker.on_done(1.0, True, rank=0, leg_tokens=10)
    assert worker.in_flight == 0 and worker.tokens_in_flight == 0
    assert worker.in_flight_per_rank == [0] and worker.tokens_in_flight_per_rank == [0]


def test_cache_aware_follows_a_prefix_only_under_its_salt():
    """A salted prompt is cached only under its salt (the servers hash its pages from it):
    cache_aware once sent it after the same prompt served under no salt, to a worker where
    it could find nothing, and away from its own salt's worker."""
    config = RouterConfig(prefix_block_len=4, cache_threshold=0.5)
    a, b = make_workers(2, config)
    policy = CacheAware(config)
    prompt = "You are a helpful assistant. " * 4
    a.set_reported_load([10])
    assert policy.choose([a, b], prompt) is b  # unsalted: b serves it
    a.set_reported_load([0])
    b.set_reported_load([10])
    assert policy.choose([a, b], prompt, "tenant-key") is a  # nothing under the salt yet
    a.set_reported_load([10])
    b.set_reported_load([0])
    assert policy.choose([a, b], prompt, "tenant-key") is a  # its salt's worker
    assert policy.choose([a, b], prompt) is b  # and the unsalted prompt's


def test_cache_aware_per_rank_sends_a_prefix_back_to_the_rank_that_served_it():
    """With --dp-aware the router names the rank, and a server's ranks do not share a cache.
    cache_aware followed a prefix to the server only and left the rank to the rotation, so a
    conversation's turns landed on the server's ranks in turn (DP 2: every other turn found
    its history missing)."""
    config = RouterConfig(prefix_block_len=4, cache_threshold=0.5, dp_aware=True)
    a, b = make_workers(2, config)
    for worker in (a, b):
        worker.set_dp_size(3)
    policy = CacheAware(config, per_rank=True)
    conversations = [f"conversation {i}: " + "turn " * 20 for i in range(6)]
    homes = {}
    for prompt in conversations:
        worker, rank = policy.choose_with_rank([a, b], prompt)
        worker.on_dispatch(0.0, 10, rank)
        homes[prompt] = (worker.url, rank)
    assert len(set(homes.values())) == 6  # nothing matched: each went where it was idlest
    for _ in range(3):
        for prompt in conversations:  # the next turn: its history plus a question
            worker, rank = policy.choose_with_rank([a, b], prompt + "and then?")
            assert (worker.url, rank) == homes[prompt]
    assert policy.choose([a, b], conversations[0]) is not None  # choose() takes it too


def test_cache_aware_per_rank_balances_the_ranks_when_nothing_matches():
    config = RouterConfig(prefix_block_len=4, dp_aware=True)
    (worker,) = make_workers(1, config)
    worker.set_dp_size(2)
    worker.on_dispatch(0.0, 10, 0)
    policy = CacheAware(config, per_rank=True)
    assert policy.choose_with_rank([worker], "a new prompt, cached nowhere")[1] == 1
    assert policy.choose_with_rank([worker], [1, [2], 3])[1] == 1  # not token ids: by load


def test_the_prefix_table_forgets_every_rank_of_a_worker():
    table = PrefixTable(4, 100)
    table.insert("abcdefgh", ("http://a", 0))
    table.insert("abcdefgh", ("http://a", 1))
    table.insert("abcdefgh", "http://b")
    table.forget_worker("http://a")
    owners = [("http://a", 0), ("http://a", 1), "http://b"]
    assert table.match("abcdefgh", owners) == {owners[0]: 0, owners[1]: 0, "http://b": 8}


def test_cache_aware_per_rank_spreads_a_prefix_every_request_shares_over_the_ranks():
    """A system prompt in every request: the rank that served it first matched every later
    request, and the balance check compared whole servers, so with one DP server that rank
    got every request while the others idled. Each rank's tokens in flight count now."""
    config = RouterConfig(prefix_block_len=4, dp_aware=True, balance_abs_threshold=256)
    (worker,) = make_workers(1, config)
    worker.set_dp_size(2)
    policy = CacheAware(config, per_rank=True)
    system = "You are a helpful assistant. " * 10
    ranks = []
    for i in range(20):
        prompt = system + f"question {i}"
        _, rank = policy.choose_with_rank([worker], prompt)
        worker.on_dispatch(0.0, len(prompt), rank)
        ranks.append(rank)
    assert 6 <= ranks.count(0) <= 14, ranks
