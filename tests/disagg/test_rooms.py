"""The room state machine (pure): one way forward per live state, failure from any live
state, and every other move rejected."""

from __future__ import annotations

import itertools

import pytest

from pdserve.disagg.rooms import (
    FINAL,
    IllegalRoomTransition,
    RoomState,
    can_transition,
    transition,
)

S = RoomState
LEGAL = {
    (S.WAITING_FOR_REQUEST, S.WAITING_FOR_INPUT),  # prefill: the request came second
    (S.BOOTSTRAPPING, S.WAITING_FOR_INPUT),  # prefill: page list came; decode: sent it
    (S.WAITING_FOR_INPUT, S.TRANSFERRING),
    (S.TRANSFERRING, S.SUCCESS),
} | {(src, S.FAILED) for src in S if src not in FINAL}


@pytest.mark.parametrize(
    "path",
    [
        [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING, S.SUCCESS],
        [S.WAITING_FOR_REQUEST, S.WAITING_FOR_INPUT, S.TRANSFERRING, S.SUCCESS],
        [S.BOOTSTRAPPING, S.FAILED],
        [S.WAITING_FOR_REQUEST, S.WAITING_FOR_INPUT, S.FAILED],
        [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING, S.FAILED],
    ],
)
def test_the_paths_of_a_room(path):
    state = path[0]
    for dst in path[1:]:
        state = transition(42, state, dst)
    assert state is path[-1]


ILLEGAL = sorted(
    set(itertools.product(S, S)) - LEGAL, key=lambda move: (move[0].value, move[1].value)
)


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL])
def test_every_other_move_is_rejected(src, dst):
    assert not can_transition(src, dst)
    with pytest.raises(IllegalRoomTransition, match=f"room 42: {src.value} -> {dst.value}"):
        transition(42, src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.BOOTSTRAPPING, S.TRANSFERRING),  # a send before the page list
        (S.TRANSFERRING, S.WAITING_FOR_INPUT),  # backwards
        (S.WAITING_FOR_INPUT, S.WAITING_FOR_INPUT),  # a duplicate event
        (S.SUCCESS, S.FAILED),  # failure does not rewrite a finished room
        (S.FAILED, S.FAILED),
    ],
)
def test_skips_backward_moves_repeats_and_final_states_are_rejected(src, dst):
    with pytest.raises(IllegalRoomTransition):
        transition(1, src, dst)
