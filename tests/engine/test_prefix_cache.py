"""The prefix cache core and the page pool over it: matching, duplicates, pins, LRU
eviction of leaves; then random operation sequences (hypothesis) that keep every invariant
of page ownership and never hand a request a page whose KV is not its prefix's."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.page_hash import page_hashes
from pdserve.engine.page_pool import PagePool, pages_for
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.request import Request, SamplingParams


def cache_with_pages(num_pages: int = 16) -> tuple[PrefixCache, PageAllocator]:
    allocator = PageAllocator(num_pages)
    return PrefixCache(allocator), allocator


def test_match_returns_the_longest_cached_chain_prefix():
    cache, allocator = cache_with_pages()
    pages = allocator.alloc(3)
    assert cache.insert([11, 12, 13], pages) == []
    assert cache.match([11, 12, 13, 14]) == pages
    assert cache.match([11, 12, 99, 13]) == pages[:2]
    assert cache.match([99, 11]) == []
    assert (cache.num_cached_pages, cache.num_evictable_pages) == (3, 3)


def test_a_page_already_cached_under_its_hash_is_returned_for_freeing():
    cache, allocator = cache_with_pages()
    first, second = allocator.alloc(2), allocator.alloc(3)
    cache.insert([1, 2], first)
    duplicates = cache.insert([1, 2, 3], second)
    assert duplicates == second[:2]
    assert cache.match([1, 2, 3]) == first + second[2:]
    allocator.free(duplicates)
    assert allocator.num_used == cache.num_cached_pages == 3


def test_a_pinned_page_reinserted_by_its_user_is_its_own_entry():
    cache, allocator = cache_with_pages()
    pages = allocator.alloc(2)
    cache.insert([1, 2], pages)
    cache.acquire(pages[:1])
    assert cache.insert([1, 2], pages) == []
    cache.release(pages[:1])
    assert cache.num_evictable_pages == 2


def test_eviction_takes_least_recently_used_leaves_and_skips_pinned_pages():
    cache, allocator = cache_with_pages(8)
    old, new = allocator.alloc(3), allocator.alloc(2)
    cache.insert([1, 2, 3], old)
    cache.insert([7, 8], new)
    assert cache.evict(1) == [old[2]]  # the old chain's leaf, never its stem first
    cache.acquire(old[:2])
    assert cache.evict(5) == [new[1], new[0]]  # the pinned chain stays
    assert cache.num_evictable_pages == 0 and allocator.num_free == 6
    cache.release(old[:2])
    assert cache.evict(5) == [old[1], old[0]]
    assert allocator.num_free == 8 and cache.num_evicted_pages == 5


def test_a_flush_is_not_counted_as_evictions():
    """`/flush_cache` added every page it dropped to pdserve_prefix_cache_evicted_pages_total,
    so an operator's flush read on dashboards as pages lost to cache pressure."""
    cache, allocator = cache_with_pages(8)
    cache.insert([1, 2, 3], allocator.alloc(3))
    assert cache.evict(1) and cache.num_evicted_pages == 1
    assert cache.flush() == 2
    assert cache.num_evicted_pages == 1 and allocator.num_free == 8


def test_release_refreshes_recency():
    cache, allocator = cache_with_pages(8)
    a, b = allocator.alloc(1), allocator.alloc(1)
    cache.insert([1], a)
    cache.insert([2], b)
    cache.acquire(a)
    cache.release(a)  # a was used after b
    assert cache.evict(1) == b


def test_flush_drops_every_unreferenced_page_and_keeps_pinned_ones():
    cache, allocator = cache_with_pages()
    pages = allocator.alloc(4)
    cache.insert([1, 2, 3], pages[:3])
    cache.insert([1, 5], [pages[0], pages[3]])
    cache.acquire(pages[:2])
    assert cache.flush() == 2  # pages 2 and 3; 0 and 1 are pinned
    assert cache.match([1, 2, 3]) == pages[:2]
    cache.release(pages[:2])
    assert cache.flush() == 2 and allocator.num_used == 0


def test_misuse_raises_and_changes_nothing():
    cache, allocator = cache_with_pages()
    pages = allocator.alloc(2)
    with pytest.raises(ValueError, match="not cached"):
        cache.acquire(pages)
    cache.insert([1], pages[:1])
    with pytest.raises(ValueError, match="not pinned"):
        cache.release(pages[:1])
    with pytest.raises(ValueError, match="under other hashes"):
        cache.insert([9], pages[:1])
    assert cache.match([1]) == pages[:1] and cache.num_evictable_pages == 1


# ---- the page pool under random operations ----------------------------------------------

PAGE = 2
NUM_PAGES = 12


def test_matched_pages_are_not_counted_as_room_for_their_own_request():
    allocator = PageAllocator(4)
    pool = PagePool(allocator, PAGE, PrefixCache(allocator), hash_seed=5)
    first = Request("first", [1, 2, 3, 4, 5], SamplingParams())
    pool.take(first, 5)
    first.num_computed = 5
    pool.put_back(first, keep_kv=True)  # 2 full pages cached, unreferenced; 2 free
    other = Request("other", [9] * 3, SamplingParams())
    assert pool.take(other, 3) is not None  # the 2 free pages
    again = Request("again", [1, 2, 3, 4, 6], SamplingParams())
    # Needs 1 page past its 2 matched ones; the only evictable pages are those 2.
    assert pool.num_available == 2 and not pool.can_take(again)
    assert pool.take(again, 5) is None and pool.cache.num_evictable_pages == 2
    pool.put_back(other, keep_kv=False)
    assert pool.can_take(again) and len(pool.take(again, 5)) == 1
    assert again.num_pinned_pages == 2


def _computed_and_cached(pool: PagePool, req: Request) -> list[int]:
    """Admit `req`, compute its prompt, end it with its KV cached; its page ids."""
    assert pool.take(req, req.seq_len) is not None
    page_ids, req.num_computed = req.page_ids, req.seq_len
    pool.put_back(req, keep_kv=True)
    return page_ids


def test_requests_share_cached_pages_only_under_the_same_salt():
    allocator = PageAllocator(16)
    pool = PagePool(allocator, PAGE, PrefixCache(allocator), hash_seed=5)
    prompt = [1, 2, 3, 4, 5, 6, 7]  # 3 full pages, all matchable
    plain = _computed_and_cached(pool, Request("plain", prompt, SamplingParams()))
    # unsalted: the hashes of before salts existed
    assert pool.cache.match(page_hashes(prompt, PAGE, 5)) == plain[:3]
    salted = Request("a1", prompt, SamplingParams(), cache_salt="a")
    assert pool.match(salted) == []
    a_pages = _computed_and_cached(pool, salted)
    assert not set(a_pages[:3]) & set(plain[:3])
    assert pool.match(Request("a2", prompt, SamplingParams(), cache_salt="a")) == a_pages[:3]
    assert pool.match(Request("b", prompt, SamplingParams(), cache_salt="b")) == []
    assert pool.match(Request("plain2", prompt, SamplingParams())) == plain[:3]
    assert pool.cache.num_cached_pages == 6  # the prompt twice: unsalted and under "a"


class PagePoolMachine(RuleBasedStateMachine):
    """Requests over a 3-token alphabet (so prefixes are shared), some salted, are admitted,
    computed, cached while running, decoded, preempted and finished in any order, with
    evictions and flushes between. A request may end with pages a transfer still uses set
    aside (any run of its pages from some page on: a delta send reads the pages past
    decode's prefix), released later, in parts. `written` models the KV: which tokens each
    page holds, and the salt of the request that wrote them (a salted request must never
    start from another salt's pages)."""

    def __init__(self):
        super().__init__()
        self.allocator = PageAllocator(NUM_PAGES)
        self.cache = PrefixCache(self.allocator)
        self.pool = PagePool(self.allocator, PAGE, self.cache, hash_seed=5)
        self.live: list[Request] = []
        self.aside: list[list[int]] = []  # pages set aside and not released yet, in parts
        self.written: dict[int, tuple[int, ...]] = {}
        self.num_reqs = 0

    def _admit(self, req: Request) -> None:
        can_take = self.pool.can_take(req)  # what has_runnable() relies on
        new_page_ids = self.pool.take(req, req.seq_len)
        assert (new_page_ids is not None) == can_take
        if new_page_ids is None:
            return
        assert new_page_ids == req.page_ids[req.num_pinned_pages :]
        assert len(req.page_ids) == pages_for(req.seq_len, PAGE)
        assert req.num_pinned_pages * PAGE <= req.seq_len - 1
        tokens = req.prompt_ids + req.output_ids
        for i, page_id in enumerate(req.page_ids[: req.num_pinned_pages]):
            assert self.written[page_id] == (req.cache_salt, *tokens[i * PAGE : (i + 1) * PAGE])
        req.num_computed = req.num_pinned_pages * PAGE
        self.live.append(req)

    @rule(
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3 * NUM_PAGES),
        salt=st.sampled_from([None, "a"]),
    )
    def admit(self, tokens, salt):
        self.num_reqs += 1
        self._admit(Request(f"r{self.num_reqs}", tokens, SamplingParams(), cache_salt=salt))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        req = data.draw(st.sampled_from(self.live))
        end = data.draw(st.integers(req.num_computed, req.seq_len))
        tokens = req.prompt_ids + req.output_ids
        for page in range(req.num_computed // PAGE, pages_for(end, PAGE)):
            assert page >= req.num_pinned_pages, "a shared cached page was written"
            self.written[req.page_ids[page]] = (
                req.cache_salt,
                *tokens[page * PAGE : min(end, (page + 1) * PAGE)],
            )
        req.num_computed = end

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        req = data.draw(st.sampled_from(self.live))
        if req.num_computed < req.seq_len:
            return
        missing = pages_for(req.seq_len + 1, PAGE) - len(req.page_ids)
        page_ids = self.pool.alloc(missing)
        if page_ids is not None:
            req.output_ids.append(token)
            req.page_ids.extend(page_ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cache_computed(self, data):
        req = data.draw(st.sampled_from(self.live))
        num_pinned = req.num_pinned_pages
        self.pool.cache_computed(req)
        assert num_pinned <= req.num_pinned_pages <= req.num_computed // PAGE
        tokens = req.prompt_ids + req.output_ids
        for i, page_id in enumerate(req.page_ids[: req.num_pinned_pages]):
            assert self.written[page_id] == (req.cache_salt, *tokens[i * PAGE : (i + 1) * PAGE])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep_kv=st.booleans(), readmit=st.booleans())
    def end(self, data, keep_kv, readmit):
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        self.pool.put_back(req, keep_kv)
        assert req.page_ids == [] and req.num_pinned_pages == 0
        if readmit:  # preemption: the same sequence comes back
            self._admit(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep_kv=st.booleans())
    def end_with_pages_set_aside(self, data, keep_kv):
        req = data.draw(st.sampled_from(self.live))
        kept = req.page_ids[data.draw(st.integers(0, len(req.page_ids))) :]
        self.live.remove(req)
        self.pool.set_aside(req, kept)
        self.pool.put_back(req, keep_kv)
        cut = data.draw(st.integers(0, len(kept)))
        self.aside += [part for part in (kept[:cut], kept[cut:]) if part]

    @precondition(lambda self: self.aside)
    @rule(data=st.data())
    def release_set_aside(self, data):
        part = data.draw(st.sampled_from(self.aside))
        self.aside.remove(part)
        self.pool.release_set_aside(part)

    @rule(num_pages=st.integers(0, NUM_PAGES))
    def evict(self, num_pages):
        evicted = self.cache.evict(num_pages)
        assert len(evicted) <= num_pages
        assert len(evicted) == min(num_pages, self.pool.num_evictable + len(evicted))
        in_use = {p for r in self.live for p in r.page_ids} | {p for k in self.aside for p in k}
        assert not set(evicted) & in_use

    @rule()
    def flush(self):
        self.cache.flush()
        assert self.cache.num_evictable_pages == 0
        cached = [p for p in range(NUM_PAGES) if self.cache.is_cached(p)]
        assert all(self.cache.refcount(p) > 0 for p in cached)

    @invariant()
    def every_page_has_exactly_one_place(self):
        cached = {p for p in range(NUM_PAGES) if self.cache.is_cached(p)}
        owned = [p for r in self.live for p in r.page_ids[r.num_pinned_pages :]]
        aside = self.pool.set_aside_pages
        assert len(owned) == len(set(owned)) and not set(owned) & cached
        assert not aside & (cached | set(owned))
        assert self.allocator.num_used == len(cached) + len(owned) + len(aside)
        assert self.allocator.num_used + self.allocator.num_free == NUM_PAGES
        for page_id in cached:
            pins = sum(page_id in r.page_ids[: r.num_pinned_pages] for r in self.live)
            pins += self.pool.set_aside_pins[page_id]
            assert self.cache.refcount(page_id) == pins
        # A page a transfer still uses is its own, or cached and pinned: never reused.
        for page_id in {p for k in self.aside for p in k}:
            assert page_id in aside or self.cache.refcount(page_id) > 0
        unreferenced = sum(self.cache.refcount(p) == 0 for p in cached)
        assert self.cache.num_evictable_pages == unreferenced
        assert self.pool.num_used == len(owned) + len(aside) + len(cached) - unreferenced

    @invariant()
    def a_parent_is_pinned_at_least_as_often_as_its_children(self):
        """The cache's invariant, on which counting every unpinned page as evictable rests."""
        pages = self.cache._pages
        for page in pages.values():
            if page.parent_hash is not None:
                assert pages[page.parent_hash].refcount >= page.refcount

    @invariant()
    def pinned_pages_are_a_cached_chain_prefix(self):
        for req in self.live:
            pinned = req.page_ids[: req.num_pinned_pages]
            assert self.cache.match(req.page_hashes[: len(pinned)]) == pinned


PagePoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_page_pool_keeps_its_invariants = PagePoolMachine.TestCase
