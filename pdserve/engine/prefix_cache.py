"""The paged prefix cache of one worker (pure: no torch, no I/O).

Full KV pages outlive the request that computed them, keyed by their chained page hash
(`page_hash.py`), so a later request with the same prefix reuses them. Requests pin the
pages they use (reference counts); unreferenced pages are evicted least-recently-used,
leaves first, back to the `PageAllocator`, which stays the only owner of free pages.
Every page that enters or leaves is recorded in `events` (`kv_events.py`) for the worker.

Invariant: a request pins a whole matched chain, so a page's refcount is at least each of
its children's; hence every unreferenced page can be evicted once its children are.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pdserve.engine.kv_events import CacheEventLog
from pdserve.engine.page_allocator import PageAllocator


@dataclass
class CachedPage:
    page_id: int
    parent_hash: int | None  # None: the first page of a sequence
    refcount: int = 0  # requests (or transfers) that pin it
    last_use: int = 0  # logical clock: larger is more recent
    num_children: int = 0  # cached pages whose parent it is


class PrefixCache:
    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self._pages: dict[int, CachedPage] = {}  # page hash -> page
        self._hash_of: dict[int, int] = {}  # page id -> page hash
        self._clock = 0
        # Eviction candidates (last_use, hash); entries go stale and are checked on pop.
        self._leaves: list[tuple[int, int]] = []
        self.num_evictable_pages = 0  # cached pages with refcount 0
        self.num_evicted_pages = 0  # lifetime counters, for metrics
        self.num_hit_tokens = 0
        self.num_lookup_tokens = 0
        self.events = CacheEventLog()

    @property
    def num_cached_pages(self) -> int:
        return len(self._pages)

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._hash_of

    def contains(self, page_hash: int) -> bool:
        return page_hash in self._pages

    def refcount(self, page_id: int) -> int:
        return self._pages[self._hash_of[page_id]].refcount

    def match(self, hashes: list[int]) -> list[int]:
        """Page ids of the longest cached prefix of the chain `hashes` (nothing pinned)."""
        page_ids = []
        for page_hash in hashes:
            page = self._pages.get(page_hash)
            if page is None:
                break
            page_ids.append(page.page_id)
        return page_ids

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's prompt tokens and how many of them came from the cache."""
        self.num_lookup_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def acquire(self, page_ids: list[int]) -> None:
        """Pin cached pages: they are not evicted until released."""
        for page in self._cached(page_ids):
            if page.refcount == 0:
                self.num_evictable_pages -= 1
            page.refcount += 1

    def release(self, page_ids: list[int]) -> None:
        """Unpin pages taken with acquire(); they count as used now."""
        now = self._tick()
        pages = self._cached(page_ids)
        if any(page.refcount == 0 for page in pages):
            raise ValueError(f"releasing cached pages that are not pinned: {page_ids}")
        for page in pages:
            page.refcount -= 1
            page.last_use = now
            if page.refcount == 0:
                self.num_evictable_pages += 1
                self._push_if_leaf(page)

    def insert(self, hashes: list[int], page_ids: list[int]) -> list[int]:
        """Cache a sequence's full pages (the chain from its first page). Returns the pages
        the caller must free: those whose hash another page already holds. A page the
        caller pinned from the cache is its own entry: touched, not returned."""
        if len(hashes) != len(page_ids):
            raise ValueError(f"{len(hashes)} hashes for {len(page_ids)} pages")
        foreign = [p for h, p in zip(hashes, page_ids, strict=True) if self._hash_of.get(p, h) != h]
        if foreign:
            raise ValueError(f"pages {foreign} are cached under other hashes")
        now = self._tick()
        duplicates = []
        parent_hash = None
        for page_hash, page_id in zip(hashes, page_ids, strict=True):
            page = self._pages.get(page_hash)
            if page is None:
                page = self._add(page_hash, page_id, parent_hash)
            elif page.page_id != page_id:
                duplicates.append(page_id)
            page.last_use = now
            if page.refcount == 0:
                self._push_if_leaf(page)
            parent_hash = page_hash
        return duplicates

    def evict(self, num_pages: int) -> list[int]:
        """Free up to `num_pages` unreferenced pages to the allocator, least recently used
        leaves first; returns their ids. Counted in `num_evicted_pages`."""
        evicted = self._drop(num_pages)
        self.num_evicted_pages += len(evicted)
        return evicted

    def flush(self) -> int:
        """Drop every unreferenced page; returns how many. Not evictions (the metric of
        pages the cache lost for room): an operator's flush would read as cache pressure."""
        num_dropped = len(self._drop(self.num_evictable_pages))
        if not self._pages:
            self.events.cleared()
        return num_dropped

    def _drop(self, num_pages: int) -> list[int]:
        evicted: list[int] = []
        while len(evicted) < num_pages and self._leaves:
            last_use, page_hash = heapq.heappop(self._leaves)
            page = self._pages.get(page_hash)
            if page is None or page.last_use != last_use or not self._is_evictable_leaf(page):
                continue  # stale entry
            self._remove(page_hash, page)
            evicted.append(page.page_id)
        self.allocator.free(evicted)
        return evicted

    def page_hashes(self) -> list[int]:
        """Every cached page's hash (for a debug dump)."""
        return list(self._pages)

    # ---- internals ---------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _cached(self, page_ids: list[int]) -> list[CachedPage]:
        missing = [p for p in page_ids if p not in self._hash_of]
        if missing:
            raise ValueError(f"pages are not cached: {missing}")
        return [self._pages[self._hash_of[p]] for p in page_ids]

    def _add(self, page_hash: int, page_id: int, parent_hash: int | None) -> CachedPage:
        page = CachedPage(page_id, parent_hash)
        self._pages[page_hash] = page
        self._hash_of[page_id] = page_hash
        if parent_hash is not None:
            self._pages[parent_hash].num_children += 1
        self.num_evictable_pages += 1
        self.events.stored(page_hash, parent_hash)
        return page

    def _remove(self, page_hash: int, page: CachedPage) -> None:
        del self._pages[page_hash]
        del self._hash_of[page.page_id]
        self.num_evictable_pages -= 1
        self.events.removed(page_hash)
        if page.parent_hash is not None:
            parent = self._pages[page.parent_hash]
            parent.num_children -= 1
            self._push_if_leaf(parent)

    @staticmethod
    def _is_evictable_leaf(page: CachedPage) -> bool:
        return page.refcount == 0 and page.num_children == 0

    def _push_if_leaf(self, page: CachedPage) -> None:
        if not self._is_evictable_leaf(page):
            return
        heapq.heappush(self._leaves, (page.last_use, self._hash_of[page.page_id]))
        if len(self._leaves) > 2 * len(self._pages) + 64:
            self._leaves = [
                (p.last_use, h) for h, p in self._pages.items() if self._is_evictable_leaf(p)
            ]
            heapq.heapify(self._leaves)
