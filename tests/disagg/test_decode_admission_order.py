"""Decode admits in arrival order across its two queues: rooms (reserved in each poll) and
the engine's waiting requests (a local prefill, `disagg_local_prefill`, or a preempted
request; admitted by the next engine step). Polls ran before every step, so a freed request
slot always went to a room: with rooms coming steadily a local request waited for as long
as they came (30 s behind 740 rooms in a real-process probe, max-running-requests 1).
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


def _request(rid: str, room: int | None, endpoint: str) -> GenerateReq:
    info = None if room is None else DisaggInfo(room=room, prefill_endpoint=endpoint)
    return GenerateReq(rid=rid, input_ids=[5, 6, 7, 8], sampling=GREEDY, disagg=info)


def test_a_local_request_is_not_overtaken_by_rooms_that_came_after_it() -> None:
    engine = Engine.from_config(
        EngineConfig(model_path="tiny-random", page_size=16, max_running_requests=1)
    )
    transport = make_transport("zmq", engine.kv_pool, None)
    hooks = DecodeWorkerHooks(engine, DisaggConfig(), transport, "d")
    prefill = make_transport("zmq", torch.zeros(8, hooks.transport.page_nbytes // 4), "127.0.0.1")
    page_lists: list[int] = []

    def turn() -> None:
        hooks.poll(time.monotonic())
        for event in prefill.poll(5):
            if isinstance(event, Inbound) and isinstance(event.msg, m.Handshake):
                prefill.send(event.peer, m.HandshakeResult(ok=True))
            elif isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                page_lists.append(event.msg.room)

    def until(cond, what: str, step: bool = False) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"never: {what}"
            turn()
            if step:
                engine.step()

    try:
        hooks.on_generate(_request("room-1", 1, prefill.endpoint))  # takes the one slot
        until(lambda: page_lists == [1], "room 1's page list")
        hooks.on_generate(_request("local", None, prefill.endpoint))  # waits in the engine
        hooks.on_generate(_request("room-2", 2, prefill.endpoint))  # queued behind it
        until(lambda: 2 in hooks.queue, "room 2 queued")
        hooks.on_abort("room-1", "done with it")  # the slot is free again
        turn()  # the worker loop: a poll, then an engine step
        engine.step()
        assert engine.get("local").state is not ReqState.WAITING, "a later room took the slot"
        assert 2 in hooks.queue and page_lists == [1]
        # Once the local request has finished, the room is next.
        until(lambda: page_lists == [1, 2], "room 2's page list", step=True)
        assert engine.get("local") is None
    finally:
        hooks.close()
        prefill.close()
