"""Batched `/query_dp_ranks` polling for one prefill bootstrap server: the pure schedule.

Runs in the decode front end. Every pending room for one bootstrap address goes into one
request per poll; polls back off while rooms stay unknown; each room has its own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.disagg.bootstrap_registry import RoomFailure


@dataclass
class QueryOutcome:
    resolved: dict[int, int] = field(default_factory=dict)
    failed: dict[int, RoomFailure] = field(default_factory=dict)


class PendingRooms:
    def __init__(self, min_interval_s: float = 0.002, max_interval_s: float = 0.1):
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self._deadlines: dict[int, float] = {}
        self._interval_s = min_interval_s
        self._next_poll_at: float | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, room: int) -> bool:
        return room in self._deadlines

    def add(self, room: int, now: float, timeout_s: float) -> None:
        self._deadlines[room] = now + timeout_s
        # A new room is asked about at once (batched with whatever else is pending).
        self._interval_s = self.min_interval_s
        self._next_poll_at = now

    def rooms(self) -> list[int]:
        return list(self._deadlines)

    def next_wakeup(self) -> float | None:
        """When the shell should next act: the next poll or the earliest deadline."""
        if not self._deadlines:
            return None
        earliest = min(self._deadlines.values())
        return earliest if self._next_poll_at is None else min(self._next_poll_at, earliest)

    def poll_due(self, now: float) -> bool:
        return (
            bool(self._deadlines) and self._next_poll_at is not None and now >= self._next_poll_at
        )

    def on_sent(self, now: float) -> None:
        """A query went out; the next one (if still needed) comes after the backoff."""
        self._next_poll_at = now + self._interval_s
        self._interval_s = min(self._interval_s * 2, self.max_interval_s)

    def on_answer(self, answer: dict[int, int | RoomFailure]) -> QueryOutcome:
        outcome = QueryOutcome()
        for room, value in answer.items():
            if room not in self._deadlines:
                continue
            del self._deadlines[room]
            if isinstance(value, RoomFailure):
                outcome.failed[room] = value
            else:
                outcome.resolved[room] = value
        return outcome

    def expire(self, now: float) -> list[int]:
        expired = [room for room, deadline in self._deadlines.items() if now >= deadline]
        for room in expired:
            del self._deadlines[room]
        return expired

    def discard(self, room: int) -> None:
        self._deadlines.pop(room, None)
