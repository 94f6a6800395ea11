"""PageAllocator: exact accounting, all-or-nothing allocation, double free rejected."""

from __future__ import annotations

import pytest

from pdserve.engine.page_allocator import PageAllocator


def test_alloc_and_free_keep_exact_counts():
    alloc = PageAllocator(8)
    first = alloc.alloc(3)
    second = alloc.alloc(5)
    assert first is not None and second is not None
    assert len(set(first) | set(second)) == 8
    assert (alloc.num_free, alloc.num_used) == (0, 8)
    alloc.free(first)
    assert (alloc.num_free, alloc.num_used) == (3, 5)
    alloc.free(second)
    assert (alloc.num_free, alloc.num_used) == (8, 0)


def test_alloc_beyond_free_returns_none_and_takes_nothing():
    alloc = PageAllocator(4)
    assert alloc.alloc(3) is not None
    assert alloc.alloc(2) is None
    assert alloc.num_free == 1
    assert alloc.alloc(0) == []


def test_double_free_raises_and_changes_nothing():
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    alloc.free(pages)
    with pytest.raises(ValueError, match="not in use"):
        alloc.free(pages)
    assert (alloc.num_free, alloc.num_used) == (4, 0)


def test_partly_bad_free_is_rejected_whole():
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    with pytest.raises(ValueError):
        alloc.free([pages[0], pages[0]])
    with pytest.raises(ValueError):
        alloc.free([pages[0], 99])
    assert alloc.num_used == 2


def test_freed_pages_are_reused():
    alloc = PageAllocator(2)
    pages = alloc.alloc(2)
    alloc.free(pages)
    assert sorted(alloc.alloc(2)) == sorted(pages)


def test_zero_pages_is_a_config_error():
    with pytest.raises(ValueError):
        PageAllocator(0)
