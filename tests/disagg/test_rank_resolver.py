"""The pure DP rank rules of docs/protocol.md section 4, over every combination.

The key property: whatever the prefill side decides, the decode side (given only what the
prefill server advertises and the request's fields) either finds the same rank, or the
request fails on prefill with a reason that the decode leg will also see.
"""

import itertools

import pytest

from pdserve.disagg.rank_resolver import (
    PrefillAction,
    PrefillServerInfo,
    RankError,
    ResolvePath,
    conflict_message,
    decide_prefill,
    home_rank,
    registers_all_rooms,
    resolve_decode,
)

METHODS = ["follow_bootstrap_room", "round_robin", "shortest_queue", "total_tokens"]


def _routing_cases(room: int, dp_size: int):
    """(routed_dp_rank, disagg_prefill_dp_rank) pairs as a router or client may send them."""
    home = home_rank(room, dp_size)
    other = (home + 1) % dp_size
    return [
        (None, None),
        (home, None),
        (other, None),
        (home, home),
        (other, other),
        (other, home),  # explicit rank wrong
        (None, dp_size),  # explicit rank out of range
    ]


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("force_prefill", [False, True])
def test_decode_always_finds_the_prefill_rank_or_both_legs_fail(dp_size, method, force_prefill):
    for room in [0, 1, 2, 5, 2**63 - 1, 123456789012345]:
        for routed, explicit in _routing_cases(room, dp_size):
            # A routed rank overrides the method; otherwise the method picks (any rank is
            # possible for the non-follow methods; follow picks home).
            candidates = (
                [routed]
                if routed is not None
                else (
                    [home_rank(room, dp_size)]
                    if method == "follow_bootstrap_room"
                    else range(dp_size)
                )
            )
            for rank in candidates:
                if rank >= dp_size:
                    continue
                _check_one(room, rank, dp_size, method, force_prefill, explicit)


def _check_one(room, rank, dp_size, method, force, explicit):
    registry: dict[int, int] = {}
    try:
        action = decide_prefill(room, rank, dp_size, method, force, explicit)
    except RankError as exc:
        prefill_error = str(exc)
    else:
        prefill_error = None
        if action is PrefillAction.REGISTER:
            registry[room] = rank
    info = PrefillServerInfo(
        dp_size, method == "follow_bootstrap_room", registers_all_rooms(method, force)
    )
    try:
        path, decode_rank = resolve_decode(room, info, explicit)
    except RankError as exc:
        assert prefill_error is not None, "decode rejected what prefill accepted"
        assert "out of range" in str(exc)
        return
    if path is ResolvePath.QUERY:
        decode_rank = registry.get(room)
        if prefill_error is None:
            assert decode_rank == rank, "a querying decode must find the registered rank"
    if prefill_error is None:
        assert decode_rank == rank, (room, rank, dp_size, method, force, explicit, path)
    # When prefill failed, decode's rank may be anything: the prefill side tells that
    # worker (or the registry) about the failure, so the decode leg fails with the reason.


def test_conflict_message_is_the_specified_one():
    with pytest.raises(RankError) as info:
        decide_prefill(
            room=5,
            rank=0,
            dp_size=2,
            method="follow_bootstrap_room",
            force=False,
            explicit_rank=None,
        )
    assert str(info.value) == (
        "follow_bootstrap_room conflict: dispatched to dp_rank 0 but bootstrap_room 5 implies "
        "dp_rank 1; set PDSERVE_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing"
    )
    assert str(info.value) == conflict_message(5, 0, 2)


def test_force_registers_aligned_rooms_too():
    # SGLang leaves aligned rooms unregistered under FORCE and decode waits forever.
    action = decide_prefill(4, 0, 2, "follow_bootstrap_room", True, None)
    assert action is PrefillAction.REGISTER


def test_fast_path_publishes_nothing_and_decode_needs_no_query():
    assert decide_prefill(7, 1, 2, "follow_bootstrap_room", False, None) is PrefillAction.NOTHING
    info = PrefillServerInfo(2, True, False)
    assert resolve_decode(7, info, None) == (ResolvePath.FAST_PATH, 1)


def test_decode_force_alone_cannot_split_the_sides():
    # Decode's own FORCE is not an input: the prefill's advertisement decides.
    info = PrefillServerInfo(4, follow_bootstrap_room=True, registers_all_rooms=False)
    assert resolve_decode(10, info, None) == (ResolvePath.FAST_PATH, 2)


@pytest.mark.parametrize("dp_size,explicit", [(2, 2), (2, -1), (1, 1), (3, 3)])
def test_explicit_rank_outside_the_prefill_dp_size_fails_on_both_sides(dp_size, explicit):
    with pytest.raises(RankError):
        decide_prefill(0, 0, dp_size, "round_robin", False, explicit)
    with pytest.raises(RankError):
        resolve_decode(0, PrefillServerInfo(dp_size, False, True), explicit)


def test_single_rank_needs_nothing():
    for method, force in itertools.product(METHODS, [False, True]):
        assert decide_prefill(9, 0, 1, method, force, None) is PrefillAction.NOTHING
    assert resolve_decode(9, PrefillServerInfo(1, False, True), None) == (
        ResolvePath.SINGLE_RANK,
        0,
    )


def test_forward_mode_serves_the_conflict_and_nothing_else():
    """--rank-mismatch forward changes one cell: follow_bootstrap_room, r != home, no FORCE."""
    fbr = "follow_bootstrap_room"
    assert decide_prefill(5, 0, 2, fbr, False, None, forward=True) is PrefillAction.FORWARD
    assert decide_prefill(4, 0, 2, fbr, False, None, forward=True) is PrefillAction.NOTHING
    assert decide_prefill(5, 0, 2, fbr, True, None, forward=True) is PrefillAction.REGISTER
    assert decide_prefill(5, 0, 2, fbr, False, 0, forward=True) is PrefillAction.NOTHING
    assert decide_prefill(5, 0, 1, fbr, False, None, forward=True) is PrefillAction.NOTHING
    with pytest.raises(RankError, match="conflict"):
        decide_prefill(5, 0, 2, fbr, False, None, forward=False)


def test_a_request_that_moves_no_kv_breaks_no_rank_rule():
    """max_new_tokens 0: decode answers at once without resolving a rank, so neither the
    conflict nor an explicit rank unlike the dispatched one may fail the prefill leg, nor an
    explicit rank out of range: decode, which cannot tell without a query, answers 200."""
    fbr = "follow_bootstrap_room"
    assert decide_prefill(5, 0, 2, fbr, False, None, moves_kv=False) is PrefillAction.NOTHING
    assert decide_prefill(4, 0, 2, fbr, False, 1, moves_kv=False) is PrefillAction.NOTHING
    assert decide_prefill(4, 0, 2, "round_robin", False, 1, moves_kv=False) is (
        PrefillAction.NOTHING
    )
    assert decide_prefill(4, 0, 2, fbr, False, 2, moves_kv=False) is PrefillAction.NOTHING
    with pytest.raises(RankError, match="out of range"):  # where KV moves, it is a bad field
        decide_prefill(4, 0, 2, fbr, False, 2, moves_kv=True)
