"""The prefix cache core records its changes as KV events: stores merge along a chain,
evictions become removals, a flush that empties the cache is one `cleared`."""

from __future__ import annotations

from pdserve.engine.kv_events import CacheCleared, PagesRemoved, PagesStored
from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.prefix_cache import PrefixCache


def cache_with_chain(hashes: list[int]) -> tuple[PrefixCache, list[int]]:
    allocator = PageAllocator(16)
    cache = PrefixCache(allocator)
    page_ids = allocator.alloc(len(hashes))
    assert cache.insert(hashes, page_ids) == []
    return cache, page_ids


def test_an_inserted_chain_is_one_stored_event_with_no_parent():
    cache, _ = cache_with_chain([11, 12, 13])
    assert cache.events.drain() == [PagesStored([11, 12, 13], None)]
    assert cache.events.drain() == []


def test_a_chain_that_extends_a_cached_one_names_its_parent():
    cache, _ = cache_with_chain([11, 12])
    cache.events.drain()
    longer = cache.allocator.alloc(3)
    cache.insert([11, 12, 21], longer)  # the first two are duplicates of cached pages
    assert cache.events.drain() == [PagesStored([21], 12)]


def test_eviction_removes_leaves_first_in_one_event():
    cache, _ = cache_with_chain([11, 12, 13])
    cache.events.drain()
    assert len(cache.evict(2)) == 2
    assert cache.events.drain() == [PagesRemoved([13, 12])]


def test_a_flush_that_empties_the_cache_is_cleared_and_one_that_cannot_is_removals():
    cache, page_ids = cache_with_chain([11, 12, 13])
    cache.flush()
    assert cache.events.drain() == [CacheCleared()]
    cache, page_ids = cache_with_chain([11, 12, 13])
    cache.events.drain()
    cache.acquire(page_ids[:1])  # a request pins the first page
    cache.flush()
    assert cache.events.drain() == [PagesRemoved([13, 12])]
    assert cache.page_hashes() == [11]
