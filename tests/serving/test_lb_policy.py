"""The DP load-balance policy (pure): routed ranks, room following, queue and token balance."""

from __future__ import annotations

import pytest

from pdserve.serving.config import ServerArgs
from pdserve.serving.hooks import RequestError
from pdserve.serving.lb_policy import LoadBalancePolicy, RankLoad


def idle(n: int) -> list[RankLoad]:
    return [RankLoad(0, 0) for _ in range(n)]


def test_routed_rank_overrides_every_method():
    for method in ("round_robin", "shortest_queue", "total_tokens", "follow_bootstrap_room"):
        policy = LoadBalancePolicy(method, 4)
        assert policy.choose(idle(4), room=5, routed_rank=2) == 2


def test_round_robin_cycles_and_skips_dead_ranks():
    policy = LoadBalancePolicy("round_robin", 3)
    assert [policy.choose(idle(3), None, None) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    loads = [RankLoad(0, 0), RankLoad(0, 0, alive=False), RankLoad(0, 0)]
    assert {policy.choose(loads, None, None) for _ in range(4)} == {0, 2}


def test_follow_bootstrap_room_uses_room_mod_dp_size_and_needs_a_room():
    policy = LoadBalancePolicy("follow_bootstrap_room", 4)
    assert policy.choose(idle(4), room=2**62 + 7, routed_rank=None) == (2**62 + 7) % 4
    with pytest.raises(RequestError) as info:
        policy.choose(idle(4), room=None, routed_rank=None)
    assert info.value.status == 400 and "bootstrap_room" in info.value.message


def test_shortest_queue_and_total_tokens_pick_the_least_loaded():
    loads = [RankLoad(3, 10), RankLoad(1, 900), RankLoad(2, 50)]
    assert LoadBalancePolicy("shortest_queue", 3).choose(loads, None, None) == 1
    assert LoadBalancePolicy("total_tokens", 3).choose(loads, None, None) == 0


def test_ties_rotate_so_an_idle_server_spreads_requests():
    policy = LoadBalancePolicy("shortest_queue", 2)
    assert {policy.choose(idle(2), None, None) for _ in range(4)} == {0, 1}


def test_routed_to_a_dead_rank_or_no_live_rank_is_503():
    policy = LoadBalancePolicy("round_robin", 2)
    dead = [RankLoad(0, 0, alive=False), RankLoad(0, 0, alive=False)]
    for routed in (0, None):
        with pytest.raises(RequestError) as info:
            policy.choose(dead, None, routed)
        assert info.value.status == 503


@pytest.mark.parametrize(
    ("given", "method"),
    [("total_requests", "shortest_queue"), ("minimum_tokens", "total_tokens")],
)
def test_sglangs_names_for_the_methods_are_accepted(given, method):
    """`--load-balance-method total_requests` (SGLang's current name) was refused at start."""
    args = ServerArgs(load_balance_method=given)
    assert args.resolved_lb_method == method
    LoadBalancePolicy(args.resolved_lb_method, 2)
