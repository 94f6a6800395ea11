"""Continuous-batching scheduler (pure: no torch, no I/O). Runs in each worker.

Owns the queues and every page allocation (through `PagePool`: a request admitted with a
cached prefix starts computing after it). Each step is either a prefill step (prompt
chunks within a token budget) or a decode step (every running request); when both kinds
of work exist they alternate, so a stream of new prompts never starves decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.page_pool import PagePool, pages_for
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.request import ReqState, Request

__all__ = ["Batch", "PrefillChunk", "Scheduler", "pages_for"]


@dataclass
class PrefillChunk:
    req: Request
    start: int  # first position computed by this chunk
    num_tokens: int

    @property
    def is_last(self) -> bool:
        return self.start + self.num_tokens == self.req.seq_len


@dataclass
class Batch:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # sent back to waiting
    new_page_ids: list[int] = field(default_factory=list)  # allocated this step

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_running_requests: int,
        chunked_prefill_size: int,
        prefix_cache: PrefixCache | None = None,
        hash_seed: int = 0,
    ):
        self.allocator = allocator
        self.pages = PagePool(allocator, page_size, prefix_cache, hash_seed)
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.chunked_prefill_size = chunked_prefill_size
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # pages allocated, prompt partly computed
        self.running: list[Request] = []  # decoding, oldest admission first
        self.reserved: list[Request] = []  # decode role: pages allocated, KV awaited
        self._last_was_prefill = False
        self.num_preemptions = 0  # lifetime count, for metrics and tests
        # Decode role: requests queued outside (rooms) came before the waiting ones, which
        # are not admitted meanwhile (Engine.pause_waiting).
        self.waiting_paused = False

    @property
    def num_active(self) -> int:
        """Requests counted against max_running_requests."""
        return len(self.prefilling) + len(self.running) + len(self.reserved)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_runnable(self) -> bool:
        """Whether schedule() would compute something now. False while the only waiting
        work cannot be admitted until pages (held, reserved) come back."""
        if self.running or self.prefilling:
            return True
        if not self.waiting or self.waiting_paused:
            return False
        if self.num_active >= self.max_running_requests:
            return False
        return self.pages.can_take(self.waiting[0])

    def schedule(self, ahead: Collection[Request] = ()) -> Batch:
        """The next step. `ahead`: running requests whose next token is still being
        sampled (a decode step in flight); a decode step gives them room for it too."""
        batch = Batch()
        if self.running and self._last_was_prefill:
            self._schedule_decode(batch, ahead)
        else:
            self._schedule_prefill(batch)
            if not batch.prefill and self.running:
                self._schedule_decode(batch, ahead)
        self._last_was_prefill = bool(batch.prefill)
        return batch

    def _schedule_prefill(self, batch: Batch) -> None:
        budget = self.chunked_prefill_size
        for req in self.prefilling:
            self.pages.cache_computed(req)  # its earlier chunks, for requests admitted now
            if budget == 0:
                return
            budget -= self._add_chunk(batch, req, budget)
        while self.waiting and budget > 0 and self.num_active < self.max_running_requests:
            if self.waiting_paused:
                return
            req = self.waiting[0]
            page_ids = self.pages.take(req, req.seq_len)
            if page_ids is None:
                return  # FIFO: later requests wait behind the head
            self.waiting.popleft()
            self._start_after_cached_prefix(req)
            batch.new_page_ids.extend(page_ids)
            req.transition(ReqState.PREFILLING)
            self.prefilling.append(req)
            budget -= self._add_chunk(batch, req, budget)

    def _start_after_cached_prefix(self, req: Request) -> None:
        """Its pinned pages hold KV already; a first admission reports them as cached
        prompt tokens (a preempted request's re-admission does not count again)."""
        req.num_computed = req.num_pinned_pages * self.page_size
        if not req.output_ids and self.pages.cache is not None:
            req.cached_tokens = req.num_computed
            self.pages.cache.record_lookup(len(req.prompt_ids), req.cached_tokens)

    def _add_chunk(self, batch: Batch, req: Request, budget: int) -> int:
        num_tokens = min(req.seq_len - req.num_computed, budget)
        batch.prefill.append(PrefillChunk(req, req.num_computed, num_tokens))
        return num_tokens

    def _schedule_decode(self, batch: Batch, ahead: Collection[Request]) -> None:
        """Every running request decodes one token; one that needs a page and finds none
        preempts the newest running request (possibly itself) back to waiting."""
        pending = list(self.running)
        while pending:
            req = pending.pop(0)
            while not self._grow(req, batch, int(req in ahead)):
                victim = pending.pop() if pending else req
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.decode.append(req)
        self.running = list(batch.decode)

    def _grow(self, req: Request, batch: Batch, num_ahead: int) -> bool:
        """Make room for the KV of the token decoded this step: position seq_len - 1, or
        seq_len when that token is still in flight (`num_ahead` 1)."""
        missing = pages_for(req.seq_len + num_ahead, self.page_size) - len(req.page_ids)
        if missing <= 0:
            return True
        page_ids = self.pages.alloc(missing)
        if page_ids is None:
            return False
        req.page_ids.extend(page_ids)
        batch.new_page_ids.extend(page_ids)
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: its computed pages go to the prefix cache (where eviction may
        take them); the request re-prefills prompt + output so far past what is left."""
        self.pages.put_back(req, keep_kv=True)
        req.num_computed = 0
        req.transition(ReqState.WAITING)
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def on_prefilled(self, req: Request) -> None:
        """Its whole sequence is computed: it decodes from the next step on."""
        self.prefilling.remove(req)
        self.pages.cache_computed(req)
        req.transition(ReqState.RUNNING)
        self.running.append(req)

    def hold(self, req: Request) -> list[int]:
        """Prefill role: stop scheduling it but keep its pages, which it returns: they are
        the caller's to send until the request is finished."""
        self._discard(req)
        self.pages.cache_computed(req)
        req.transition(ReqState.SENDING_KV)
        return list(req.page_ids)

    def reserve(self, req: Request, use_cache: bool = False) -> list[int] | None:
        """Decode role: pages for the prompt now. With `use_cache`, the cached prefix it
        matches is pinned and only the rest is new. Returns the new pages (the KV to
        receive), or None, with nothing taken, if there is no room."""
        if self.num_active >= self.max_running_requests:
            return None
        if use_cache:
            page_ids = self.pages.take(req, len(req.prompt_ids))
        else:
            page_ids = self.pages.alloc(pages_for(len(req.prompt_ids), self.page_size))
        if page_ids is None:
            return None
        if use_cache:
            self._start_after_cached_prefix(req)
        else:
            req.page_ids = page_ids
        req.transition(ReqState.WAITING_FOR_KV)
        self.reserved.append(req)
        return page_ids

    def admit_reserved(self, req: Request) -> None:
        """Decode role: its prompt KV arrived; it joins the running batch."""
        self.reserved.remove(req)
        req.num_computed = len(req.prompt_ids)
        self.pages.cache_computed(req)
        req.transition(ReqState.RUNNING)
        self.running.append(req)

    def finish(self, req: Request, state: ReqState) -> None:
        """Terminal transition from any state; the request's pages go back to the pool."""
        self._discard(req)
        # A failed step may have left its pages half written: none of them is cached.
        self.pages.put_back(req, keep_kv=state is not ReqState.FAILED)
        req.transition(state)

    def _discard(self, req: Request) -> None:
        for queue in (self.waiting, self.prefilling, self.running, self.reserved):
            if req in queue:
                queue.remove(req)
                return
