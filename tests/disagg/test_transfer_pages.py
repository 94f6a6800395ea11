"""The transport's pure page bookkeeping: page-id checks, frame plans and write grants."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.zmq.pages import (
    SHORT_LIST,
    WriteGrants,
    num_runs,
    page_array,
    plan_frames,
    run_bounds,
    run_start,
    runs,
)

PAGE = 64


def kv(dst: list[int], counts: list[int], room: int = 1, page_nbytes: int = PAGE) -> m.KVHeader:
    return m.KVHeader(
        room=room, frame_page_counts=counts, page_nbytes=page_nbytes, dst_page_ids=dst
    )


@pytest.mark.parametrize(
    "ids, error",
    [
        ([0, 9], None),
        ([0, 10], "out of range"),
        ([-1], "out of range"),
        ([3, 3], "duplicate"),
        ([[1]], "flat"),
    ],
)
def test_page_array_accepts_only_distinct_in_range_ids(ids, error) -> None:
    if error is None:
        assert page_array(ids, 10, "ids").tolist() == ids
    else:
        with pytest.raises(ValueError, match=error):
            page_array(ids, 10, "ids")


@pytest.mark.parametrize("n", [2, SHORT_LIST, SHORT_LIST + 1, 4 * SHORT_LIST])
def test_page_array_checks_short_and_long_lists_alike(n: int) -> None:
    """Short lists are checked in Python, long ones by numpy: the same verdicts, with or
    without the check for duplicates."""
    ids = np.random.default_rng(n).permutation(2 * n).tolist()[:n]
    assert page_array(ids, 2 * n, "ids").tolist() == ids
    for bad, error in [
        ([*ids[:-1], ids[0]], "duplicate"),
        ([*ids[:-1], 2 * n], "out of range"),
        ([-1, *ids[1:]], "out of range"),
    ]:
        with pytest.raises(ValueError, match=error):
            page_array(bad, 2 * n, "ids")
        if error == "duplicate":  # range only: cuda_ipc's sources
            assert page_array(bad, 2 * n, "ids", distinct=False).tolist() == bad
        else:
            with pytest.raises(ValueError, match=error):
                page_array(bad, 2 * n, "ids", distinct=False)


def test_run_start_finds_single_ascending_runs_only() -> None:
    assert run_start(np.array([4, 5, 6])) == 4
    assert run_start(np.array([7])) == 7
    assert run_start(np.array([4, 6])) is None
    assert run_start(np.array([5, 4])) is None
    assert run_start(np.array([], dtype=np.int64)) is None


def test_runs_splits_ids_into_maximal_ascending_runs() -> None:
    assert runs(np.array([4, 5, 6, 9, 3, 4, 8])) == [(0, 3), (3, 1), (4, 2), (6, 1)]
    assert runs(np.array([2])) == [(0, 1)]
    assert runs(np.array([], dtype=np.int64)) == []


def test_run_bounds_are_the_byte_ranges_of_the_runs_in_order() -> None:
    ids = np.array([4, 5, 6, 9, 3, 4])
    assert num_runs(ids) == 3
    assert run_bounds(ids, page_nbytes=10) == [(40, 70), (90, 100), (30, 50)]
    assert num_runs(np.array([], dtype=np.int64)) == 0
    assert run_bounds(np.array([], dtype=np.int64), page_nbytes=10) == []


def test_plan_frames_cuts_in_order_and_pairs_pages() -> None:
    plans = plan_frames(np.arange(10), np.arange(10)[::-1].copy(), pages_per_frame=4)
    assert [p.src.tolist() for p in plans] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.dst.tolist() for p in plans] == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]
    with pytest.raises(ValueError):
        plan_frames(np.arange(3), np.arange(2), pages_per_frame=4)


@pytest.mark.parametrize(
    "peer, header, sizes, reason",
    [
        ("a", kv([5, 6], [2]), [2 * PAGE], None),
        ("a", kv([6], [1]), [PAGE], None),
        ("b", kv([5], [1]), [PAGE], "no_grant"),
        ("a", kv([5], [1], room=2), [PAGE], "no_grant"),
        ("a", kv([5], [1], page_nbytes=32), [32], "page_nbytes"),
        ("a", kv([5, 9], [2]), [2 * PAGE], "pages_not_granted"),
        ("a", kv([5, 6], [1, 1]), [PAGE], "frames"),
        ("a", kv([5], [1]), [], "frames"),
        ("a", kv([], [0]), [0], "frames"),
        ("a", kv([5, 6], [1]), [PAGE], "page_count"),
        ("a", kv([5, 6], [2]), [2 * PAGE + 1], "frame_size"),
    ],
)
def test_grant_check_names_why_a_kv_message_is_refused(peer, header, sizes, reason) -> None:
    grants = WriteGrants()
    grants.grant("a", 1, [5, 6, 7])
    assert grants.check(peer, header, sizes, PAGE, moves_bytes=True) == reason


def test_control_only_backend_accepts_frameless_headers_only() -> None:
    grants = WriteGrants()
    grants.grant("a", 1, [5, 6])
    assert grants.check("a", kv([5, 6], []), [], PAGE, moves_bytes=False) is None
    assert grants.check("a", kv([5, 6], [2]), [2 * PAGE], PAGE, moves_bytes=False) == "frames"
    assert grants.check("a", kv([5, 6], []), [], PAGE, moves_bytes=True) == "frames"


def test_grants_count_distinct_pages_and_end_by_room_or_peer() -> None:
    grants = WriteGrants()
    grants.grant("a", 1, [5, 6])
    grants.grant("a", 2, [7])
    grants.grant("b", 3, [8])
    grants.record(1, [5], PAGE)
    grants.record(1, [5, 6], 2 * PAGE)
    assert grants.revoke(1, peer="b") is None  # only the granted peer's status ends it
    done = grants.revoke(1, peer="a")
    assert done is not None and done.received == {5, 6} and done.nbytes == 3 * PAGE
    grants.revoke_peer("a")
    assert len(grants) == 1 and grants.revoke(3) is not None
