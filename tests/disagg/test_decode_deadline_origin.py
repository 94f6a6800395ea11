"""Whose fault a decode worker's deadline on its prefill peer is: a KV handshake or KV not in
by its deadline is prefill's (`origin: prefill`), as a lost connection is, so a router's retry
avoids that prefill server. It had no origin: the retry avoided the sound decode server and
went back to the frozen prefill. Unless the decode worker itself stood still past the KV
heartbeat timeout (stopped): then the lapse, or a connection lost meanwhile, is its own (no
origin), not its sound peer's.
A real engine and decode hooks; the prefill worker is a real transport the test plays."""

from __future__ import annotations

import time

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_worker import DecodeWorkerHooks
from pdserve.disagg.stall import StallClock
from pdserve.disagg.transfer import Inbound, make_transport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq, ReqOutput

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)
CFG = DisaggConfig(bootstrap_timeout_s=1.0, kv_wait_timeout_s=1.0, heartbeat_timeout_s=3.0)


def request(room: int, endpoint: str) -> GenerateReq:
    info = DisaggInfo(room=room, prefill_dp_rank=0, prefill_endpoint=endpoint)
    return GenerateReq(rid=f"r{room}", input_ids=[5, 6, 7, 8], sampling=GREEDY, disagg=info)


def test_the_stall_clock_takes_a_long_gap_between_turns_for_a_stall_for_a_while() -> None:
    clock = StallClock(limit_s=3.0, peer_origin="prefill")
    for now in (0.0, 0.1, 2.0, 5.0):  # gaps up to the limit: running
        clock.turn(now)
        assert not clock.stalled_lately(now) and clock.blame(now) == "prefill"
    clock.turn(8.5)  # 3.5 s without a turn: it did not run
    assert clock.stalled_lately(8.5) and clock.stalled_lately(11.5)
    assert clock.blame(11.5) is None  # its own fault meanwhile
    assert not clock.stalled_lately(11.6) and clock.blame(11.6) == "prefill"


def test_a_decode_deadline_on_prefill_blames_prefill_unless_decode_stood_still() -> None:
    engine = Engine.from_config(EngineConfig(model_path="tiny-random", page_size=16))
    hooks = DecodeWorkerHooks(engine, CFG, make_transport("zmq", engine.kv_pool, None), "d")
    shape = (8, hooks.transport.page_nbytes // 4)
    prefill = make_transport("zmq", torch.zeros(*shape), "127.0.0.1")
    silent = make_transport("zmq", torch.zeros(*shape), "127.0.0.1")  # never answers
    outputs: list[ReqOutput] = []
    page_lists: list[int] = []
    offset = 0.0  # added to the clock: the test's jumps in time

    def turn(jump_s: float = 0.0) -> None:
        nonlocal offset
        offset += jump_s
        outputs.extend(hooks.poll(time.monotonic() + offset))
        for event in prefill.poll(5):
            if isinstance(event, Inbound) and isinstance(event.msg, m.Handshake):
                prefill.send(event.peer, m.HandshakeResult(ok=True))
            elif isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                page_lists.append(event.msg.room)

    def arrive(room: int, endpoint: str) -> None:
        outputs.extend(hooks.on_generate(request(room, endpoint), time.monotonic() + offset))

    def until_page_list(room: int) -> None:
        deadline = time.monotonic() + 30
        while room not in page_lists:
            assert time.monotonic() < deadline, f"no page list for room {room}: {outputs}"
            turn()

    def failure(rid: str) -> ReqOutput:
        (out,) = [o for o in outputs if o.rid == rid]
        return out

    try:
        arrive(1, prefill.endpoint)  # its KV never comes
        arrive(3, silent.endpoint)  # its handshake is never answered
        until_page_list(1)
        turn(1.5)  # past both deadlines, this worker running all along
        for rid, wait in (("r1", "the KV of room 1"), ("r3", "the KV handshake")):
            out = failure(rid)
            assert out.error_status == 504 and f"waiting for {wait}" in out.error_message, out
            assert out.error_origin == "prefill", out
        arrive(2, prefill.endpoint)
        until_page_list(2)
        turn(5.0)  # the next turn 5 s later: this worker was stopped past its KV wait
        out = failure("r2")
        assert out.error_status == 504 and "waiting for the KV of room 2" in out.error_message
        assert out.error_origin is None, out
        assert "this worker itself did not run for" in out.error_message, out
        arrive(4, prefill.endpoint)
        prefill.close()  # its connection drops while this worker has just run again
        deadline = time.monotonic() + 2.5  # within the heartbeat timeout of the stall
        while not [o for o in outputs if o.rid == "r4"]:
            assert time.monotonic() < deadline, f"room 4 not failed: {outputs}"
            turn()
        out = failure("r4")
        assert out.error_status == 503 and "lost the connection" in out.error_message, out
        assert out.error_origin is None, out
        assert "this worker itself did not run for" in out.error_message, out
    finally:
        hooks.close()
        prefill.close()
        silent.close()
