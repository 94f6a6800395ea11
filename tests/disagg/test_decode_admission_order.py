"""Decode admits in arrival order across its two queues: rooms (reserved in each poll) and
the engine's waiting requests (a local prefill, `disagg_local_prefill`, or a preempted
request; admitted by the next engine step). Polls ran before every step, so a freed request
slot always went to a room: with rooms coming steadily a local request waited for as long
as they came (30 s behind 740 rooms in a real-process probe, max-running-requests 1). And
the other way: a room waiting for pages let later local requests take them.
A real engine and decode hooks; the prefill worker is a real transport the test plays."""

from __future__ import annotations

import time

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_worker import DecodeWorkerHooks
from pdserve.disagg.transfer import Inbound, make_transport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import ReqState, SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


class Decode:
    """A decode worker's engine and hooks, driven by the test as its loop would (a poll,
    then an engine step), and the prefill worker it talks to, played by the test."""

    def __init__(self, **engine_args) -> None:
        self.engine = Engine.from_config(
            EngineConfig(model_path="tiny-random", page_size=16, **engine_args)
        )
        transport = make_transport("zmq", self.engine.kv_pool, None)
        self.hooks = DecodeWorkerHooks(self.engine, DisaggConfig(), transport, "d")
        page_nbytes = transport.page_nbytes
        self.prefill = make_transport("zmq", torch.zeros(8, page_nbytes // 4), "127.0.0.1")
        self.page_lists: list[int] = []

    def local(self, rid: str, num_tokens: int, max_new_tokens: int = 4) -> None:
        req = _request(rid, None, list(range(5, 5 + num_tokens)), "")
        req.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.hooks.on_generate(req)

    def room(self, room: int, num_tokens: int) -> None:
        ids = list(range(100, 100 + num_tokens))  # no prefix of the local requests' prompts
        self.hooks.on_generate(_request(f"room-{room}", room, ids, self.prefill.endpoint))

    def state(self, rid: str) -> ReqState | None:
        req = self.engine.get(rid)
        return None if req is None else req.state

    def turn(self, step: bool = True) -> None:
        self.hooks.poll(time.monotonic())
        if step:
            self.engine.step()
        for event in self.prefill.poll(5):
            if isinstance(event, Inbound) and isinstance(event.msg, m.Handshake):
                self.prefill.send(event.peer, m.HandshakeResult(ok=True))
            elif isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                self.page_lists.append(event.msg.room)

    def until(self, cond, what: str, step: bool = True) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"never: {what}"
            self.turn(step)

    def close(self) -> None:
        self.hooks.close()
        self.prefill.close()


def _request(rid: str, room: int | None, ids: list[int], endpoint: str) -> GenerateReq:
    info = None if room is None else DisaggInfo(room=room, prefill_endpoint=endpoint)
    return GenerateReq(rid=rid, input_ids=ids, sampling=GREEDY, disagg=info)


def test_a_local_request_is_not_overtaken_by_rooms_that_came_after_it() -> None:
    d = Decode(max_running_requests=1)
    try:
        d.room(1, 4)  # takes the one request slot
        d.until(lambda: d.page_lists == [1], "room 1's page list", step=False)
        d.local("local", 4)  # waits in the engine
        d.room(2, 4)  # queued behind it
        d.until(lambda: 2 in d.hooks.queue, "room 2 queued", step=False)
        d.hooks.on_abort("room-1", "done with it")  # the slot is free again
        d.turn()
        assert d.state("local") is not ReqState.WAITING, "a later room took the slot"
        assert 2 in d.hooks.queue and d.page_lists == [1]
        # Once the local request has finished, the room is next.
        d.until(lambda: d.page_lists == [1, 2], "room 2's page list")
        assert d.state("local") is None
    finally:
        d.close()


def test_a_room_waiting_for_pages_is_not_overtaken_by_local_requests_after_it() -> None:
    """Four pages: a running local request holds three, a room that needs two waits, and a
    later local request that needs one waits behind it (it took the page before, and
    local requests coming steadily kept the room waiting)."""
    d = Decode(max_running_requests=4, max_total_tokens=64)
    try:
        d.local("first", 40, max_new_tokens=8)  # 3 pages, running
        d.turn()
        assert d.state("first") is ReqState.RUNNING
        d.room(1, 20)  # 2 pages: 1 is free
        d.until(lambda: 1 in d.hooks.queue, "room 1 queued", step=False)
        d.local("later", 4)  # 1 page
        d.turn()  # a decode step
        d.turn()  # a prefill step: the engine admits what it may
        assert d.state("later") is ReqState.WAITING, "a later local request took the pages"
        d.until(lambda: d.page_lists == [1], "room 1's page list once the first ends")
        assert d.state("first") is None
        d.until(lambda: d.state("later") is None, "the later local request served")
    finally:
        d.close()
