"""Rank-mismatch forwarding (PROTOCOL.md section 10), the home worker's part: where the
front end dispatched rooms whose home this worker is, kept until decode's page list comes
for them or the entry expires; and which decode peer leased a room this worker does not
know yet (docs/protocol.md 5.2). Pure; runs inside each prefill worker.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardTarget:
    """The worker that serves a room instead of its home worker."""

    dp_rank: int
    kv_endpoint: str
    expires_at: float


class ForwardTable:
    """room -> ForwardTarget. An entry lives `ttl_s` (the bootstrap deadline): a decode leg
    that never sends its page list here (it resolved the rank another way, or failed) must
    not leave the entry behind."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._targets: dict[int, ForwardTarget] = {}
        self._leased: dict[int, tuple[object, float]] = {}  # room -> (decode peer, expiry)

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, room: int, dp_rank: int, kv_endpoint: str, now: float) -> object | None:
        """Record where `room` went; returns the decode peer that leased it before this
        notice came, to be redirected now (not a quarter deadline later, at its next lease)."""
        self._targets[room] = ForwardTarget(dp_rank, kv_endpoint, now + self.ttl_s)
        leased = self._leased.pop(room, None)
        return None if leased is None else leased[0]

    def note_lease(self, room: int, peer: object, now: float) -> None:
        """Decode `peer` leased `room`, which this worker knows nothing of yet."""
        self._leased[room] = (peer, now + self.ttl_s)

    def get(self, room: int) -> ForwardTarget | None:
        return self._targets.get(room)

    def pop(self, room: int) -> ForwardTarget | None:
        return self._targets.pop(room, None)

    def expire(self, now: float) -> int:
        gone = [room for room, t in self._targets.items() if now >= t.expires_at]
        for room in gone:
            del self._targets[room]
        for room in [r for r, (_, expires_at) in self._leased.items() if now >= expires_at]:
            del self._leased[room]
        return len(gone)


class LegMatcher:
    """Prefill front end: pairs where it dispatched each recent room with the worker that
    holds decode's page list for a room it has no request for (reported by that worker after
    a grace). Both legs name the room but different prefill ranks (e.g. their
    `disagg_prefill_dp_rank` differ): the page list waits on one worker, the request on
    another, each until its deadline. Entries live `ttl_s` (the bootstrap deadline). Pure."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._dispatched: dict[int, tuple[int, float]] = {}  # room -> (dp rank, expiry)
        self._unclaimed: dict[int, tuple[int, float]] = {}  # room -> (holding rank, expiry)

    def dispatched(self, room: int, dp_rank: int, now: float) -> int | None:
        """`room` went to `dp_rank`; returns the other worker that holds its page list."""
        self._expire(now)
        self._dispatched.pop(room, None)  # re-inserted last: expiries stay in order
        self._dispatched[room] = (dp_rank, now + self.ttl_s)
        holder = self._unclaimed.pop(room, None)
        return None if holder is None or holder[0] == dp_rank else holder[0]

    def unclaimed(self, room: int, holder: int, now: float) -> int | None:
        """Worker `holder` has `room`'s page list but no request; returns the worker the room
        was dispatched to, if another (else remembers the holder for the dispatch)."""
        self._expire(now)
        entry = self._dispatched.get(room)
        if entry is not None:
            return None if entry[0] == holder else entry[0]
        self._unclaimed.pop(room, None)
        self._unclaimed[room] = (holder, now + self.ttl_s)
        return None

    def _expire(self, now: float) -> None:
        for table in (self._dispatched, self._unclaimed):
            while table:
                room, (_, expires_at) = next(iter(table.items()))
                if now < expires_at:
                    break
                del table[room]
