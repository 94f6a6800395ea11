"""The prefill gate: rooms without decode's page list run only within the eager budget (the
pool less the largest request), in arrival order; rooms with it always run."""

from __future__ import annotations

from pdserve.disagg.prefill_gate import PrefillGate


def test_a_pool_no_bigger_than_the_largest_request_runs_listed_rooms_only() -> None:
    gate = PrefillGate(num_total_pages=12, max_request_pages=256)
    assert gate.eager_limit_pages == 0
    gate.park(1, 1, listed=False)
    gate.park(2, 3, listed=True)
    assert gate.release() == [2]
    assert gate.release() == [] and gate.num_parked == 1
    gate.on_listed(1)
    assert gate.release() == [1] and gate.num_parked == 0
    assert gate.num_unlisted_pages == 0


def test_unlisted_rooms_run_in_arrival_order_within_the_pool_less_the_largest_request() -> None:
    gate = PrefillGate(num_total_pages=20, max_request_pages=5)
    assert gate.eager_limit_pages == 15
    for room, num_pages in [(1, 6), (2, 6), (3, 4), (4, 1)]:
        gate.park(room, num_pages, listed=False)
    # Room 3 would pass 15 pages; room 4 would fit, but never overtakes it.
    assert gate.release() == [1, 2]
    assert gate.num_unlisted_pages == 12 and gate.is_parked(3) and gate.is_parked(4)
    gate.on_listed(1)  # decode reserved room 1: its pages leave the budget
    assert gate.release() == [3, 4]
    assert gate.num_unlisted_pages == 11


def test_a_listed_room_runs_at_once_whatever_the_budget_and_whoever_waits_before_it() -> None:
    gate = PrefillGate(num_total_pages=20, max_request_pages=5)
    gate.park(1, 15, listed=False)
    gate.park(2, 4, listed=False)
    gate.park(3, 5, listed=False)
    assert gate.release() == [1]
    gate.on_listed(3)
    assert gate.release() == [3]  # room 2 still waits for the budget
    assert gate.is_parked(2) and gate.num_unlisted_pages == 15


def test_a_room_that_ends_frees_its_budget_and_leaves_the_queue() -> None:
    gate = PrefillGate(num_total_pages=10, max_request_pages=4)
    gate.park(1, 5, listed=False)
    gate.park(2, 3, listed=False)
    gate.park(3, 2, listed=False)
    assert gate.release() == [1]
    gate.drop(2)  # failed while parked: never released
    assert gate.release() == []  # 5 + 2 > 6
    gate.drop(1)  # computed, then failed before its page list
    assert gate.release() == [3]
    assert gate.num_parked == 0 and gate.num_unlisted_pages == 2
    gate.on_listed(99)  # a page list for a room with no request yet: nothing to do
    gate.drop(99)
    assert gate.release() == []
