"""Pure cores: room generation and alignment, health hysteresis, circuit breaker."""

import random

import pytest

from pdserve.router.health import BreakerState, CircuitBreaker, HealthState
from pdserve.router.rooms import ROOM_LIMIT, RoomSource


def test_rooms_are_63_bit_and_cover_the_range():
    source = RoomSource(random.Random(1))
    rooms = [source.draw() for _ in range(2000)]
    assert all(0 <= r < ROOM_LIMIT for r in rooms)
    assert max(rooms) > ROOM_LIMIT // 2  # high bits are used, not a small counter
    assert len(set(rooms)) == len(rooms)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 7, 8])
def test_aligned_room_lands_on_the_chosen_rank(num_ranks):
    source = RoomSource(random.Random(num_ranks))
    for rank in range(num_ranks):
        rooms = [source.draw_aligned(num_ranks, rank) for _ in range(500)]
        assert all(r % num_ranks == rank and 0 <= r < ROOM_LIMIT for r in rooms)
        assert max(rooms) > ROOM_LIMIT // 2


def test_aligned_room_stays_below_the_limit_at_the_top_rank():
    class Top(random.Random):
        def randrange(self, n):  # the largest k the source may draw
            return n - 1

    for num_ranks in (3, 7, 8):
        for rank in range(num_ranks):
            room = RoomSource(Top()).draw_aligned(num_ranks, rank)
            assert room < ROOM_LIMIT and room % num_ranks == rank
            assert room + num_ranks >= ROOM_LIMIT  # and it is the last such room


def test_aligned_room_rejects_a_rank_out_of_range():
    with pytest.raises(ValueError):
        RoomSource().draw_aligned(2, 2)


def test_draw_many_gives_distinct_aligned_rooms():
    rooms = RoomSource(random.Random(3)).draw_many(64, num_ranks=4, rank=3)
    assert len(set(rooms)) == 64 and all(r % 4 == 3 for r in rooms)


def test_draw_many_is_linear_for_a_large_batch():
    """200k rooms drew in minutes when each draw scanned a list; a set makes it instant."""
    rooms = RoomSource(random.Random(4)).draw_many(200_000)
    assert len(set(rooms)) == 200_000


def test_health_needs_consecutive_failures_to_drop_and_successes_to_return():
    health = HealthState(failure_threshold=3, success_threshold=2, healthy=True)
    assert not health.record(False) and not health.record(False)
    assert not health.record(True)  # the run of failures is broken
    assert [health.record(False) for _ in range(3)] == [False, False, True]
    assert not health.healthy
    assert not health.record(True) and not health.record(False) and not health.record(True)
    assert health.record(True) and health.healthy


def test_breaker_opens_after_failures_and_half_opens_after_the_timeout():
    cb = CircuitBreaker(failure_threshold=2, success_threshold=2, open_s=10.0)
    cb.record(False, now=0.0)
    assert cb.state is BreakerState.CLOSED and cb.allows(0.0)
    cb.record(False, now=1.0)
    assert cb.state is BreakerState.OPEN and not cb.allows(5.0)
    assert cb.allows(11.0)
    cb.on_dispatch(11.0)
    assert cb.state is BreakerState.HALF_OPEN
    assert not cb.allows(11.1)  # one probe at a time
    cb.record(True, now=12.0)
    assert cb.allows(12.0) and cb.state is BreakerState.HALF_OPEN
    cb.on_dispatch(12.0)
    cb.record(True, now=13.0)
    assert cb.state is BreakerState.CLOSED


def test_breaker_reopens_when_the_probe_fails_and_frees_a_probe_without_verdict():
    cb = CircuitBreaker(failure_threshold=1, success_threshold=1, open_s=5.0)
    cb.record(False, now=0.0)
    cb.on_dispatch(6.0)
    cb.record(False, now=6.0)
    assert cb.state is BreakerState.OPEN and not cb.allows(10.0) and cb.allows(11.0)
    cb.on_dispatch(11.0)
    cb.release()  # the probe was aborted because of its peer: no verdict
    assert cb.allows(11.0) and cb.state is BreakerState.HALF_OPEN


def test_breaker_of_a_server_back_from_failed_checks_lets_a_probe_through_at_once():
    cb = CircuitBreaker(failure_threshold=1, success_threshold=1, open_s=10.0)
    cb.record(False, now=0.0)  # a request failed while the server was down
    assert not cb.allows(3.0)
    cb.on_back(3.0)  # its health checks failed, then passed: it restarted
    assert cb.allows(3.0)
    cb.on_dispatch(3.0)
    assert cb.state is BreakerState.HALF_OPEN and not cb.allows(3.1)  # a probe, not all
    cb.record(False, now=3.5)  # a probe that fails opens it for the whole period again
    assert not cb.allows(13.0) and cb.allows(13.5)
    closed = CircuitBreaker(failure_threshold=1, success_threshold=1, open_s=10.0)
    closed.on_back(3.0)
    assert closed.state is BreakerState.CLOSED and closed.allows(3.0)
