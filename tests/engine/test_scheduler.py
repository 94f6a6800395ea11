"""Scheduler: admission by pages and max_running_requests, chunked prefill, alternation
with decode, preemption when pages run out, reservations for the decode role."""

from __future__ import annotations

from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.request import ReqState, Request, SamplingParams
from pdserve.engine.scheduler import Batch, Scheduler

PAGE = 4


def make_scheduler(num_pages=16, max_running=8, chunk=16) -> Scheduler:
    return Scheduler(PageAllocator(num_pages), PAGE, max_running, chunk)


def req(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(prompt_len)), SamplingParams(max_new_tokens=100))


def apply(sched: Scheduler, batch: Batch) -> None:
    """What the engine does after a step: KV computed, one token per finished prefill/decode."""
    for chunk in batch.prefill:
        chunk.req.num_computed += chunk.num_tokens
        if chunk.is_last:
            chunk.req.output_ids.append(7)
            sched.on_prefilled(chunk.req)
    for r in batch.decode:
        r.num_computed += 1
        r.output_ids.append(7)


def step(sched: Scheduler) -> Batch:
    batch = sched.schedule()
    apply(sched, batch)
    return batch


def test_long_prompt_is_prefilled_in_chunks_within_budget():
    sched = make_scheduler(chunk=16)
    r = req("a", 40)
    sched.add(r)
    sizes = []
    while r.state is not ReqState.RUNNING:
        batch = step(sched)
        sizes.append([(c.start, c.num_tokens) for c in batch.prefill])
    assert sizes == [[(0, 16)], [(16, 16)], [(32, 8)]]
    assert len(r.page_ids) == 10  # ceil(40 / 4), allocated at admission


def test_several_prompts_share_one_chunk_budget():
    sched = make_scheduler(chunk=16)
    a, b = req("a", 10), req("b", 10)
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert [(c.req.rid, c.start, c.num_tokens) for c in batch.prefill] == [
        ("a", 0, 10),
        ("b", 0, 6),
    ]
    batch = sched.schedule()  # alternation: a decodes before b's second chunk
    assert batch.decode == [a] and not batch.prefill
    apply(sched, batch)
    batch = step(sched)
    assert [(c.req.rid, c.start, c.num_tokens) for c in batch.prefill] == [("b", 6, 4)]


def test_prefill_and_decode_alternate_so_decode_progresses():
    sched = make_scheduler(num_pages=64, chunk=8)
    sched.add(req("a", 4))
    step(sched)
    kinds = []
    for i in range(6):
        sched.add(req(f"n{i}", 8))
        batch = step(sched)
        kinds.append("P" if batch.prefill else "D")
    assert kinds == ["D", "P", "D", "P", "D", "P"]


def test_admission_waits_for_free_pages_fifo():
    sched = make_scheduler(num_pages=4)
    a, b, c = req("a", 12), req("b", 8), req("c", 1)
    for r in (a, b, c):
        sched.add(r)
    batch = step(sched)
    assert [ch.req.rid for ch in batch.prefill] == ["a"]  # b needs 2 pages, 1 is free
    assert list(sched.waiting) == [b, c]  # c does not jump the queue
    assert sched.allocator.num_free == 1
    sched.finish(a, ReqState.FINISHED)
    assert sched.allocator.num_free == 4
    batch = step(sched)
    assert [ch.req.rid for ch in batch.prefill] == ["b", "c"]


def test_admission_bounded_by_max_running_requests():
    sched = make_scheduler(num_pages=64, max_running=2)
    for i in range(4):
        sched.add(req(f"r{i}", 2))
    batch = step(sched)
    assert len(batch.prefill) == 2
    assert len(sched.waiting) == 2
    assert sched.num_active == 2


def test_out_of_pages_in_decode_preempts_newest_back_to_waiting():
    sched = make_scheduler(num_pages=4, chunk=64)
    old, new = req("old", 8), req("new", 8)  # two full pages each: the pool is full
    sched.add(old)
    sched.add(new)
    step(sched)
    assert sched.allocator.num_free == 0
    batch = step(sched)  # both need a third page to decode position 8
    assert batch.decode == [old]
    assert batch.preempted == [new]
    assert new.state is ReqState.WAITING and new.page_ids == [] and new.num_computed == 0
    assert sched.waiting[0] is new
    assert len(old.page_ids) == 3 and sched.allocator.num_used == 3
    sched.finish(old, ReqState.FINISHED)
    batch = step(sched)
    # Recompute: the prompt plus the token it had already produced.
    assert [(c.req.rid, c.start, c.num_tokens) for c in batch.prefill] == [("new", 0, 9)]


def test_a_lone_request_that_cannot_grow_preempts_itself():
    sched = make_scheduler(num_pages=3, chunk=64)
    a = req("a", 8)
    sched.add(a)
    step(sched)
    held = sched.allocator.alloc(1)  # e.g. pages held by a request sending its KV
    batch = step(sched)
    assert batch.preempted == [a] and not batch.decode
    assert sched.allocator.num_used == 1
    sched.allocator.free(held)
    assert step(sched).prefill[0].req is a


def test_nothing_is_runnable_while_the_waiting_head_lacks_pages():
    sched = make_scheduler(num_pages=4)
    assert not sched.has_runnable()
    held = sched.allocator.alloc(3)
    sched.add(req("a", 8))
    assert not sched.has_runnable() and sched.schedule().empty
    sched.allocator.free(held)
    assert sched.has_runnable()
    step(sched)
    assert sched.has_runnable()  # running


def test_reserve_allocates_prompt_pages_or_nothing():
    sched = make_scheduler(num_pages=4, max_running=8)
    a, b = req("a", 9), req("b", 8)
    assert sched.reserve(a) is not None
    assert a.state is ReqState.WAITING_FOR_KV and len(a.page_ids) == 3
    assert sched.reserve(b) is None
    assert b.page_ids == [] and b.state is ReqState.WAITING
    assert sched.allocator.num_free == 1
    sched.admit_reserved(a)
    a.output_ids.append(7)
    batch = sched.schedule()
    assert batch.decode == [a] and a.num_computed == 9


def test_reserve_respects_max_running_requests():
    sched = make_scheduler(num_pages=64, max_running=1)
    assert sched.reserve(req("a", 2)) is not None
    assert sched.reserve(req("b", 2)) is None


def test_finish_frees_pages_from_every_queue():
    sched = make_scheduler(num_pages=64, chunk=4)
    running, prefilling, waiting, reserved = req("r", 2), req("p", 10), req("w", 2), req("k", 5)
    sched.add(running)
    step(sched)
    sched.add(prefilling)
    step(sched)  # decode of running (alternation)
    step(sched)  # first chunk of prefilling
    sched.add(waiting)
    sched.reserve(reserved)
    assert prefilling.state is ReqState.PREFILLING
    for r in (running, prefilling, waiting, reserved):
        sched.finish(r, ReqState.ABORTED)
        assert r.state is ReqState.ABORTED
    assert sched.allocator.num_used == 0
    assert not (sched.waiting or sched.prefilling or sched.running or sched.reserved)


def test_a_request_with_a_token_in_flight_gets_room_for_the_token_after_it():
    sched = make_scheduler(chunk=64)
    a, b = req("a", 7), req("b", 7)
    sched.add(a)
    sched.add(b)
    step(sched)  # prefill: 8 tokens each (position 7 sampled), two pages
    # a's token 8 is being sampled on the device: this step decodes position 8 for it
    batch = sched.schedule(ahead={a})
    assert batch.decode == [a, b]
    assert len(a.page_ids) == 3 and len(b.page_ids) == 2
    assert batch.new_page_ids == a.page_ids[2:]
