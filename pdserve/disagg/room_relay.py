"""Rank-mismatch forwarding (PROTOCOL.md section 10), the home worker's part: where the
front end dispatched rooms whose home this worker is, kept until decode's page list comes
for them or the entry expires. Pure; runs inside each prefill worker.
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

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, room: int, dp_rank: int, kv_endpoint: str, now: float) -> ForwardTarget:
        target = ForwardTarget(dp_rank, kv_endpoint, now + self.ttl_s)
        self._targets[room] = target
        return target

    def get(self, room: int) -> ForwardTarget | None:
        return self._targets.get(room)

    def pop(self, room: int) -> ForwardTarget | None:
        return self._targets.pop(room, None)

    def expire(self, now: float) -> int:
        gone = [room for room, t in self._targets.items() if now >= t.expires_at]
        for room in gone:
            del self._targets[room]
        return len(gone)
