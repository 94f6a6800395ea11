"""The server's stream of KV cache event batches (pure: no I/O). Front-end process.

Numbers the batches (seq + 1 each), keeps the most recent for replay, and mirrors every
rank's cached page hashes so a snapshot can resynchronise a subscriber. Its workers send
their events losslessly, so the mirror is the workers' caches as of `seq`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pdserve.engine.kv_events import CacheCleared, CacheEvent, PagesRemoved, PagesStored


def event_to_wire(dp_rank: int, event: CacheEvent, page_size: int) -> dict[str, Any]:
    if isinstance(event, PagesStored):
        return {
            "type": "stored",
            "dp_rank": dp_rank,
            "page_hashes": event.page_hashes,
            "parent_hash": event.parent_hash,
            "num_tokens": len(event.page_hashes) * page_size,
        }
    if isinstance(event, PagesRemoved):
        return {"type": "removed", "dp_rank": dp_rank, "page_hashes": event.page_hashes}
    return {"type": "cleared", "dp_rank": dp_rank}


class KVEventStream:
    def __init__(self, dp_size: int, page_size: int, max_recent_batches: int, life: int = 0):
        self.page_size = page_size
        self.life = life  # names this start of the server: its batches number from 1 again
        self.seq = 0  # of the last batch; 0: none yet
        self._recent: deque[dict[str, Any]] = deque(maxlen=max_recent_batches)
        self.cached: list[set[int]] = [set() for _ in range(dp_size)]

    def add(self, dp_rank: int, events: list[CacheEvent], now: float) -> dict[str, Any]:
        """The next batch, made of one worker's events (already applied to the mirror)."""
        for event in events:
            self._apply(dp_rank, event)
        self.seq += 1
        batch = {
            "seq": self.seq,
            "life": self.life,
            "ts": now,
            "events": [event_to_wire(dp_rank, e, self.page_size) for e in events],
        }
        self._recent.append(batch)
        return batch

    def _apply(self, dp_rank: int, event: CacheEvent) -> None:
        cached = self.cached[dp_rank]
        if isinstance(event, PagesStored):
            cached.update(event.page_hashes)
        elif isinstance(event, PagesRemoved):
            cached.difference_update(event.page_hashes)
        elif isinstance(event, CacheCleared):
            cached.clear()

    def snapshot(self) -> dict[str, Any]:
        """Every rank's cached pages as of batch `seq`."""
        return {"seq": self.seq, "life": self.life, "ranks": [sorted(c) for c in self.cached]}

    def replay(self, from_seq: int, life: int | None = None) -> dict[str, Any]:
        """Batches from `from_seq` on, or a snapshot when some of them are gone or
        `from_seq` is from another life of this server: the `life` the subscriber's base is
        from, when it names one (without it, a new life already at `from_seq - 1` answered
        no batch, and the subscriber kept the old life's pages)."""
        oldest = self._recent[0]["seq"] if self._recent else self.seq + 1
        other_life = life is not None and life != self.life
        if other_life or not oldest <= from_seq <= self.seq + 1:
            return {"seq": self.seq, "snapshot": self.snapshot()}
        batches = [b for b in self._recent if b["seq"] >= from_seq]
        return {"seq": self.seq, "batches": batches}
