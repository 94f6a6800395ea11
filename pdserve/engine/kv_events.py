"""Changes of a worker's prefix cache, as the cache core records them (pure: no I/O).

The worker drains them after each step and forwards them to its front end, which publishes
them (`serving/kv_publisher.py`). A page hash names its whole prefix (`page_hash.py`).
"""

from __future__ import annotations

import msgspec


class PagesStored(msgspec.Struct, tag="stored", frozen=True):
    """Consecutive pages of one chain entered the cache; `parent_hash` is the page before
    the first of them (None: they start a sequence)."""

    page_hashes: list[int]
    parent_hash: int | None


class PagesRemoved(msgspec.Struct, tag="removed", frozen=True):
    page_hashes: list[int]


class CacheCleared(msgspec.Struct, tag="cleared", frozen=True):
    """Every page left the cache."""


CacheEvent = PagesStored | PagesRemoved | CacheCleared


class CacheEventLog:
    """The events since the last drain, merged where that is free: consecutive stores of
    one chain and consecutive removals become one event each."""

    def __init__(self) -> None:
        self._events: list[CacheEvent] = []

    def stored(self, page_hash: int, parent_hash: int | None) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, PagesStored) and last.page_hashes[-1] == parent_hash:
            last.page_hashes.append(page_hash)
        else:
            self._events.append(PagesStored([page_hash], parent_hash))

    def removed(self, page_hash: int) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, PagesRemoved):
            last.page_hashes.append(page_hash)
        else:
            self._events.append(PagesRemoved([page_hash]))

    def cleared(self) -> None:
        """Everything before is moot: the cache is empty now."""
        self._events = [CacheCleared()]

    def drain(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events
