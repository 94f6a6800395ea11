"""Rank-mismatch forwarding (docs/protocol.md section 10), the home worker's part: where the
front end dispatched rooms whose home this worker is, kept until decode's page list comes
for them or the entry expires; and which decode peer leased a room this worker does not
know yet (docs/protocol.md 5.2). Pure; runs inside each prefill worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


class Expiring(Generic[V]):
    """room -> value, each entry living `ttl_s` from when it was put. Entries are kept in put
    order, so their expiries are in order too: `expire` takes them from the front."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[int, tuple[V, float]] = {}  # room -> (value, expiry)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, room: int) -> bool:
        return room in self._entries

    def put(self, room: int, value: V, now: float) -> None:
        self._entries.pop(room, None)  # re-inserted last: expiries stay in order
        self._entries[room] = (value, now + self.ttl_s)

    def get(self, room: int) -> V | None:
        entry = self._entries.get(room)
        return None if entry is None else entry[0]

    def pop(self, room: int) -> V | None:
        entry = self._entries.pop(room, None)
        return None if entry is None else entry[0]

    def expire(self, now: float) -> int:
        """Drop the entries whose time is up at `now`; how many."""
        gone = 0
        while self._entries:
            room, (_, expires_at) = next(iter(self._entries.items()))
            if now < expires_at:
                break
            del self._entries[room]
            gone += 1
        return gone


@dataclass(frozen=True)
class ForwardTarget:
    """The worker that serves a room instead of its home worker."""

    dp_rank: int
    kv_endpoint: str


class ForwardTable:
    """room -> ForwardTarget. An entry lives `ttl_s` (the bootstrap deadline): a decode leg
    that never sends its page list here (it resolved the rank another way, or failed) must
    not leave the entry behind."""

    def __init__(self, ttl_s: float):
        self._targets: Expiring[ForwardTarget] = Expiring(ttl_s)
        self._leased: Expiring[object] = Expiring(ttl_s)  # room -> the decode peer

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, room: int, dp_rank: int, kv_endpoint: str, now: float) -> object | None:
        """Record where `room` went; returns the decode peer that leased it before this
        notice came, to be redirected now (not a quarter deadline later, at its next lease)."""
        self._targets.put(room, ForwardTarget(dp_rank, kv_endpoint), now)
        return self._leased.pop(room)

    def note_lease(self, room: int, peer: object, now: float) -> None:
        """Decode `peer` leased `room`, which this worker knows nothing of yet."""
        self._leased.put(room, peer, now)

    def get(self, room: int) -> ForwardTarget | None:
        return self._targets.get(room)

    def pop(self, room: int) -> ForwardTarget | None:
        return self._targets.pop(room)

    def expire(self, now: float) -> int:
        self._leased.expire(now)
        return self._targets.expire(now)


class LegMatcher:
    """Prefill front end: pairs where it dispatched each recent room with the worker that
    holds decode's page list for a room it has no request for (reported by that worker after
    a grace). Both legs name the room but different prefill ranks (e.g. their
    `disagg_prefill_dp_rank` differ): the page list waits on one worker, the request on
    another, each until its deadline. Entries live `ttl_s` (the bootstrap deadline). Pure."""

    def __init__(self, ttl_s: float):
        self._dispatched: Expiring[int] = Expiring(ttl_s)  # room -> dp rank
        self._unclaimed: Expiring[int] = Expiring(ttl_s)  # room -> the rank holding it

    def dispatched(self, room: int, dp_rank: int, now: float) -> int | None:
        """`room` went to `dp_rank`; returns the other worker that holds its page list."""
        self._expire(now)
        self._dispatched.put(room, dp_rank, now)
        holder = self._unclaimed.pop(room)
        return None if holder == dp_rank else holder

    def unclaimed(self, room: int, holder: int, now: float) -> int | None:
        """Worker `holder` has `room`'s page list but no request; returns the worker the room
        was dispatched to, if another (else remembers the holder for the dispatch)."""
        self._expire(now)
        dp_rank = self._dispatched.get(room)
        if dp_rank is not None:
            return None if dp_rank == holder else dp_rank
        self._unclaimed.put(room, holder, now)
        return None

    def _expire(self, now: float) -> None:
        self._dispatched.expire(now)
        self._unclaimed.expire(now)
