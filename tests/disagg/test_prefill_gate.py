"""The prefill gate: rooms without decode's page list run only within the eager budget (the
pool less the largest request), in arrival order; rooms with it always run."""

from __future__ import annotations

from pdserve.disagg.prefill_gate import PrefillGate


def gate_with_unlisted(
    num_total_pages: int, max_request_pages: int, room_pages: list[int]
) -> PrefillGate:
    """A gate with rooms 1, 2, ... parked, unlisted, needing `room_pages` pages each."""
    gate = PrefillGate(num_total_pages, max_request_pages)
    for room, num_pages in enumerate(room_pages, start=1):
        gate.park(room, num_pages, listed=False)
    return gate


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
    gate = gate_with_unlisted(num_total_pages=20, max_request_pages=5, room_pages=[6, 6, 4, 1])
    assert gate.eager_limit_pages == 15
    # Room 3 would pass 15 pages; room 4 would fit, but never overtakes it.
    assert gate.release() == [1, 2]
    assert gate.num_unlisted_pages == 12 and gate.is_parked(3) and gate.is_parked(4)
    gate.on_listed(1)  # decode reserved room 1: its pages leave the budget
    assert gate.release() == [3, 4]
    assert gate.num_unlisted_pages == 11


def test_a_listed_room_runs_at_once_whatever_the_budget_and_whoever_waits_before_it() -> None:
    gate = gate_with_unlisted(num_total_pages=20, max_request_pages=5, room_pages=[15, 4, 5])
    assert gate.release() == [1]
    gate.on_listed(3)
    assert gate.release() == [3]  # room 2 still waits for the budget
    assert gate.is_parked(2) and gate.num_unlisted_pages == 15


def test_a_room_that_ends_frees_its_budget_and_leaves_the_queue() -> None:
    gate = gate_with_unlisted(num_total_pages=10, max_request_pages=4, room_pages=[5, 3, 2])
    assert gate.release() == [1]
    gate.drop(2)  # failed while parked: never released
    assert gate.release() == []  # 5 + 2 > 6
    gate.drop(1)  # computed, then failed before its page list
    assert gate.release() == [3]
    assert gate.num_parked == 0 and gate.num_unlisted_pages == 2
    gate.on_listed(99)  # a page list for a room with no request yet: nothing to do
    gate.drop(99)
    assert gate.release() == []
