"""The batched rank-query schedule (pure): batching, backoff, deadlines, failures."""

from pdserve.disagg.bootstrap_registry import RoomFailure
from pdserve.disagg.rank_query import PendingRooms


def test_new_rooms_are_asked_at_once_and_together():
    pending = PendingRooms(min_interval_s=0.01, max_interval_s=0.08)
    pending.add(1, now=0.0, timeout_s=5)
    pending.add(2, now=0.0, timeout_s=5)
    assert pending.poll_due(0.0)
    assert sorted(pending.rooms()) == [1, 2]


def test_backoff_doubles_up_to_the_cap_and_resets_on_a_new_room():
    pending = PendingRooms(min_interval_s=0.01, max_interval_s=0.04)
    pending.add(1, now=0.0, timeout_s=5)
    now, gaps = 0.0, []
    for _ in range(5):
        pending.on_sent(now)
        wake = pending.next_wakeup()
        gaps.append(round(wake - now, 3))
        assert not pending.poll_due(wake - 1e-6) and pending.poll_due(wake)
        now = wake
    assert gaps == [0.01, 0.02, 0.04, 0.04, 0.04]
    pending.add(2, now=now, timeout_s=5)
    assert pending.poll_due(now)
    pending.on_sent(now)
    assert round(pending.next_wakeup() - now, 3) == 0.01


def test_answers_resolve_and_fail_rooms_and_ignore_strangers():
    pending = PendingRooms()
    for room in (1, 2, 3):
        pending.add(room, now=0.0, timeout_s=5)
    outcome = pending.on_answer({1: 0, 2: RoomFailure("conflict", 400), 99: 1})
    assert outcome.resolved == {1: 0}
    assert outcome.failed == {2: RoomFailure("conflict", 400)}
    assert pending.rooms() == [3]


def test_each_room_expires_at_its_own_deadline():
    pending = PendingRooms()
    pending.add(1, now=0.0, timeout_s=1.0)
    pending.add(2, now=0.5, timeout_s=1.0)
    assert pending.expire(0.99) == []
    assert pending.expire(1.0) == [1]
    assert pending.next_wakeup() is not None
    assert pending.expire(1.5) == [2]
    assert pending.next_wakeup() is None and len(pending) == 0


def test_discard_stops_asking():
    pending = PendingRooms()
    pending.add(1, now=0.0, timeout_s=1.0)
    pending.discard(1)
    assert not pending.poll_due(0.0) and 1 not in pending
