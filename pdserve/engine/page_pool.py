"""Pages for requests: allocation (evicting cached pages when short), prefix matching at
admission, and the return of a request's pages at its end (pure: no torch). Worker process.

Without a prefix cache it is the bare allocator. With one, a request's `page_ids` start with
`num_pinned_pages` cached pages it shares (pinned), followed by pages it owns alone. A
request's pages are hashed from its salted seed: it matches only pages cached under its salt.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.page_hash import page_hashes, salted_seed
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.request import Request


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def _matchable_tokens(req: Request) -> int:
    """At most seq_len - 1: the last token is always computed, so there are logits to
    sample from. Prompt logprobs still owed need the logits of positions from
    logprob_start_len - 1 on, so those positions are computed too."""
    limit = req.seq_len - 1
    if req.wants_prompt_logprobs and not req.prompt_logprobs_sent:
        limit = min(limit, max((req.logprob_start_len or 0) - 1, 0))
    return limit


@dataclass
class _AsidePins:
    """The cached pages an ended request's transfer still uses (`waiting`, until released)
    and the chain from its first page to the deepest of them, pinned once: the cache can
    evict every unpinned page it counts only while a pinned page's parents are pinned too."""

    chain: list[int]
    waiting: Counter[int]


class PagePool:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        cache: PrefixCache | None = None,
        hash_seed: int = 0,
    ):
        self.allocator = allocator
        self.page_size = page_size
        self.cache = cache
        self.hash_seed = hash_seed
        self.set_aside_pages: set[int] = set()  # allocated, owned by nobody, out of use
        self._aside_pins: list[_AsidePins] = []

    @property
    def set_aside_pins(self) -> Counter[int]:
        """Cached pages pinned for transfers of ended requests, with their pin counts."""
        return Counter(p for record in self._aside_pins for p in record.chain)

    @property
    def num_evictable(self) -> int:
        return self.cache.num_evictable_pages if self.cache else 0

    @property
    def num_available(self) -> int:
        """Pages a request can get now: free ones and unreferenced cached ones."""
        return self.allocator.num_free + self.num_evictable

    @property
    def num_used(self) -> int:
        """Pages held by live requests (cached pages they pin included, once each)."""
        return self.allocator.num_used - self.num_evictable

    def _hashes(self, req: Request) -> list[int]:
        """The request's full-page hashes under its salt, memoised on it (its tokens only
        grow)."""
        if len(req.page_hashes) < req.seq_len // self.page_size:
            tokens = req.prompt_ids + req.output_ids
            if req.hash_seed is None:  # digested once per request
                req.hash_seed = salted_seed(self.hash_seed, req.cache_salt)
            req.page_hashes = page_hashes(tokens, self.page_size, req.hash_seed, req.page_hashes)
        return req.page_hashes

    def match(self, req: Request) -> list[int]:
        """Cached pages the request may start from (nothing pinned)."""
        if self.cache is None or _matchable_tokens(req) < self.page_size:
            return []
        return self.cache.match(self._hashes(req)[: _matchable_tokens(req) // self.page_size])

    def gains_from(self, req: Request, arriving: list[Request]) -> bool:
        """Whether a request whose KV is arriving (it caches its prompt pages on arrival)
        will extend the cached prefix `req` matches now: whether one of them holds the
        first matchable page the cache lacks. Hashes are chained, so one equal hash means
        an equal prefix up to it."""
        if self.cache is None:
            return False
        hashes = self._hashes(req)[: _matchable_tokens(req) // self.page_size]
        num_cached = len(self.cache.match(hashes))
        if num_cached == len(hashes):
            return False
        wanted = hashes[num_cached]
        for other in arriving:
            if len(other.prompt_ids) // self.page_size > num_cached:
                other_hashes = self._hashes(other)
                if len(other_hashes) > num_cached and other_hashes[num_cached] == wanted:
                    return True
        return False

    def can_take(self, req: Request) -> bool:
        """Whether take(req, req.seq_len) would succeed now."""
        num_needed = pages_for(req.seq_len, self.page_size)
        if self.cache is None:
            return num_needed <= self.allocator.num_free
        matched = self.match(req)
        # Matched pages nobody pins count as evictable now but are not once taken.
        num_unpinned = sum(1 for p in matched if self.cache.refcount(p) == 0)
        return num_needed - len(matched) <= self.num_available - num_unpinned

    def take(self, req: Request, num_tokens: int) -> list[int] | None:
        """Give `req` pages for `num_tokens` tokens: the cached prefix it matches, pinned,
        then new pages. Returns the new pages (to be written), or None (nothing taken)."""
        matched = self.match(req)
        if self.cache is not None:
            self.cache.acquire(matched)
        new_page_ids = self.alloc(pages_for(num_tokens, self.page_size) - len(matched))
        if new_page_ids is None:
            if self.cache is not None:
                self.cache.release(matched)
            return None
        req.page_ids = matched + new_page_ids
        req.num_pinned_pages = len(matched)
        return new_page_ids

    def alloc(self, num_pages: int) -> list[int] | None:
        """`num_pages` pages, evicting unreferenced cached pages if too few are free; None
        (and nothing taken or evicted) if even that is not enough."""
        num_short = num_pages - self.allocator.num_free
        if num_short > 0:
            if num_short > self.num_evictable:
                return None
            self.cache.evict(num_short)
        return self.allocator.alloc(num_pages)

    def cache_computed(self, req: Request) -> None:
        """Cache the running request's computed full pages now rather than at its end, as
        SGLang caches unfinished requests: requests that arrive meanwhile with the same
        prefix (the other first turns behind one system prompt) share them. The pages stay
        pinned by the request and join its pinned prefix. Stops at the first page whose
        hash another entry already holds: the request keeps its own copy of the rest."""
        if self.cache is None:
            return
        num_full = min(req.num_computed // self.page_size, len(req.page_ids))
        num_pinned = req.num_pinned_pages
        if num_full <= num_pinned:
            return
        hashes = self._hashes(req)[:num_full]
        num_new = 0
        for page_hash in hashes[num_pinned:]:
            if self.cache.contains(page_hash):
                break
            num_new += 1
        if num_new == 0:
            return
        end = num_pinned + num_new
        self.cache.insert(hashes[:end], req.page_ids[:end])
        self.cache.acquire(req.page_ids[num_pinned:end])
        req.num_pinned_pages = end

    def set_aside(self, req: Request, page_ids: list[int]) -> None:
        """Keep pages a transfer may still write or read unchanged past the ending request,
        until `release_set_aside`: its own pages stay allocated and out of use (nothing past
        its pins is cached from it); cached pages it pins stay pinned, with the cached
        prefix under them (a delta send reads only pages past decode's prefix), so they
        are neither evicted nor rewritten."""
        own = set(req.page_ids[req.num_pinned_pages :])
        pinned = req.page_ids[: req.num_pinned_pages]
        kept = {p for p in page_ids if p in own}
        req.page_ids = [p for p in req.page_ids if p not in kept]
        req.num_computed = min(req.num_computed, req.num_pinned_pages * self.page_size)
        self.set_aside_pages |= kept
        wanted = set(page_ids)
        shared = [i for i, p in enumerate(pinned) if p in wanted]
        if shared:
            chain = pinned[: shared[-1] + 1]
            self.cache.acquire(chain)
            self._aside_pins.append(_AsidePins(chain, Counter(pinned[i] for i in shared)))

    def release_set_aside(self, page_ids: list[int]) -> None:
        """The transfers into or out of these set-aside pages have ended: own pages are free;
        cached ones are done with, and a chain `set_aside` pinned is let go once all of its
        pages are (others ignored). The transport may report one room's pages in parts."""
        freed = [p for p in page_ids if p in self.set_aside_pages]
        self.set_aside_pages.difference_update(freed)
        self.allocator.free(freed)
        for page_id in set(page_ids):
            record = next((r for r in self._aside_pins if r.waiting[page_id] > 0), None)
            if record is None:
                continue
            record.waiting[page_id] -= 1
            if not +record.waiting:  # every page it waited for is released
                self._aside_pins.remove(record)
                self.cache.release(record.chain)

    def put_back(self, req: Request, keep_kv: bool) -> None:
        """The request is done with its pages. With `keep_kv`, full pages whose KV it
        computed (positions < num_computed) enter the cache; pins are dropped; the rest
        (the partial last page, pages another entry already caches) go back free."""
        page_ids, num_pinned = req.page_ids, req.num_pinned_pages
        req.page_ids, req.num_pinned_pages = [], 0
        if self.cache is None:
            if page_ids:
                self.allocator.free(page_ids)
            return
        num_kept = min(req.num_computed // self.page_size, len(page_ids)) if keep_kv else 0
        to_free = page_ids[max(num_kept, num_pinned) :]
        if num_kept:
            to_free += self.cache.insert(self._hashes(req)[:num_kept], page_ids[:num_kept])
        self.cache.release(page_ids[:num_pinned])
        self.allocator.free(to_free)
