"""The request state machine: one transition() that rejects illegal moves."""

from __future__ import annotations

import pytest

from pdserve.engine.request import (
    IllegalTransition,
    ReqState,
    Request,
    SamplingParams,
    can_transition,
)


def make(state: ReqState = ReqState.WAITING) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams())
    req.state = state
    return req


@pytest.mark.parametrize(
    "path",
    [
        [ReqState.PREFILLING, ReqState.RUNNING, ReqState.FINISHED],
        [ReqState.PREFILLING, ReqState.PREFILLING, ReqState.SENDING_KV, ReqState.FINISHED],
        [ReqState.PREFILLING, ReqState.RUNNING, ReqState.WAITING, ReqState.PREFILLING],
        [ReqState.WAITING_FOR_KV, ReqState.RUNNING, ReqState.FINISHED],
        [ReqState.WAITING_FOR_KV, ReqState.FINISHED],
        [ReqState.PREFILLING, ReqState.FINISHED],  # max_new_tokens == 0
    ],
)
def test_legal_paths(path):
    req = make()
    for state in path:
        req.transition(state)
    assert req.state is path[-1]


@pytest.mark.parametrize(
    "src,dst",
    [
        (ReqState.WAITING, ReqState.FINISHED),
        (ReqState.RUNNING, ReqState.PREFILLING),
        (ReqState.SENDING_KV, ReqState.RUNNING),
        (ReqState.WAITING_FOR_KV, ReqState.PREFILLING),
        (ReqState.FINISHED, ReqState.RUNNING),
        (ReqState.ABORTED, ReqState.FAILED),
    ],
)
def test_illegal_moves_raise_and_keep_state(src, dst):
    req = make(src)
    with pytest.raises(IllegalTransition):
        req.transition(dst)
    assert req.state is src


@pytest.mark.parametrize(
    "src", [s for s in ReqState if s.value not in ("finished", "aborted", "failed")]
)
def test_abort_and_failure_reachable_from_every_live_state(src):
    assert can_transition(src, ReqState.ABORTED)
    assert can_transition(src, ReqState.FAILED)


def test_requests_compare_by_identity():
    assert make() != make()
    req = make()
    assert req in [make(), req]
