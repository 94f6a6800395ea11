"""Whose fault a prefill worker's failure for its decode peer is when the prefill worker
itself stood still (SIGSTOP, starved) past the KV heartbeat timeout: a lost decode
connection, or a lapsed wait for decode's page list, found within that time after it runs
again is its own (no `origin`), not decode's. It blamed decode (`origin: decode`), so both
legs blamed each other and a router's retry avoided the sound decode server. A worker that
ran all along still blames decode. A real engine and prefill hooks, real decode-side
transports the test plays; the worker's clock is the test's, so a stall is a jump in it."""

from __future__ import annotations

import time

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.prefill_worker import PrefillWorkerHooks
from pdserve.disagg.transfer import Inbound, KVTransport, make_transport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq, ReqOutput
from pdserve.serving.worker_io import output_to_msg

PROMPT = [5, 6, 7, 8]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)
CFG = DisaggConfig(bootstrap_timeout_s=1.0, heartbeat_timeout_s=3.0)
PAGE_LIST_WAIT = "timed out after 1s waiting for decode's page list"


class PrefillWorker:
    """The hooks around a real engine, turned by the test on its own clock."""

    def __init__(self) -> None:
        self.engine = Engine.from_config(EngineConfig(model_path="tiny-random", page_size=16))
        transport = make_transport("zmq", self.engine.kv_pool, "127.0.0.1")
        self.hooks = PrefillWorkerHooks(self.engine, CFG, transport, dp_rank=0)
        self.now = time.monotonic()
        self.outputs: list[ReqOutput] = []
        self.decodes: list[KVTransport] = []

    def turn(self, jump_s: float = 0.0) -> None:
        """One turn of the worker loop, `jump_s` after the last (a running loop turns every
        0.1 s at most: a jump past the heartbeat timeout is a worker that stood still). The
        clock stands still while the test waits for what the sockets bring."""
        self.now += jump_s
        self.outputs += self.hooks.poll(self.now)
        if self.engine.has_work():
            steps = self.engine.step()
            held = {o.rid: o.held_page_ids for o in steps if o.held_page_ids is not None}
            outs = [output_to_msg(o) for o in steps]
            self.outputs += self.hooks.after_step(self.now, outs, held)

    def run_for(self, duration_s: float) -> None:
        """Turns every 0.1 s for `duration_s`: a worker running all along."""
        for _ in range(round(duration_s / 0.1)):
            self.turn(0.1)

    def generate(self, room: int) -> None:
        info = DisaggInfo(room=room)
        msg = GenerateReq(rid=f"r{room}", input_ids=PROMPT, sampling=GREEDY, disagg=info)
        self.outputs += self.hooks.on_generate(msg, self.now)

    def error_of(self, room: int) -> ReqOutput:
        """The error the room's request got, waiting for it (a few turns, no time jump)."""
        deadline = time.monotonic() + 10
        while not (errors := [o for o in self.outputs if o.rid == f"r{room}" and o.error_status]):
            assert time.monotonic() < deadline, f"room {room} not failed: {self.outputs}"
            self.turn()
        return errors[0]

    def close(self) -> None:
        for decode in self.decodes:
            decode.close()
        self.hooks.close()


def decode_with_page_list(worker: PrefillWorker, room: int) -> KVTransport:
    """A decode worker that handshook and sent its page list for `room`, which the prefill
    worker has taken (the room waits for its request). It listens for a data connection, as
    a decode server does: its close is seen at once, not after the heartbeat timeout."""
    pool = torch.zeros(8, worker.hooks.transport.page_nbytes // 4)
    decode = make_transport("zmq", pool, "127.0.0.1")
    worker.decodes.append(decode)  # closed with the worker, whatever happens
    peer = decode.connect(worker.hooks.kv_endpoint)
    layout, meta = worker.engine.kv_layout(), decode.handshake_meta()
    decode.send(peer, m.Handshake(decode_id=f"d{room}", layout=layout, transfer_meta=meta))
    digest = prompt_digest(PROMPT)
    page_list = m.PageList(
        room=room, dst_page_ids=[0], prompt_len=len(PROMPT), prompt_digest=digest
    )
    decode.send(peer, page_list)
    answered = False  # the handshake's answer, sent once the data connection is open
    deadline = time.monotonic() + 10
    while not (answered and room in worker.hooks.rooms and worker.hooks.rooms[room].peer):
        assert time.monotonic() < deadline, f"no handshake or page list for room {room}"
        worker.turn()
        for event in decode.poll(5):
            answered |= isinstance(event, Inbound) and isinstance(event.msg, m.HandshakeResult)
    return decode


def lost_decode_error(worker: PrefillWorker, room: int, stall_s: float) -> ReqOutput:
    """The worker's next turn comes `stall_s` after its last; then decode's page list for
    the room comes and its connection drops while the room waits for its request, which
    then comes and is answered with the room's failure."""
    worker.turn(stall_s)
    decode_with_page_list(worker, room).close()
    deadline = time.monotonic() + 10
    while room in worker.hooks.rooms:
        assert time.monotonic() < deadline, f"room {room}: its lost decode not seen"
        worker.turn()
    worker.generate(room)
    return worker.error_of(room)


def test_a_prefill_worker_that_stood_still_takes_decode_faults_for_its_own() -> None:
    worker = PrefillWorker()
    try:
        worker.generate(1)  # decode's page list never comes
        worker.run_for(1.5)  # past the deadline
        out = worker.error_of(1)
        assert out.error_status == 504 and PAGE_LIST_WAIT in out.error_message, out
        assert out.error_origin == "decode", out
        worker.generate(2)
        worker.turn(5.0)  # the next turn 5 s later: this worker was stopped past it
        out = worker.error_of(2)
        assert out.error_status == 504 and PAGE_LIST_WAIT in out.error_message, out
        assert out.error_origin is None, out
        assert "this worker itself did not run" in out.error_message, out
        worker.run_for(3.5)  # running again, past the heartbeat timeout since the stall
        out = lost_decode_error(worker, 3, stall_s=0.01)
        assert out.error_status == 503 and "lost the connection to decode" in out.error_message
        assert out.error_origin == "decode", out
        assert "did not run" not in out.error_message, out
        out = lost_decode_error(worker, 4, stall_s=5.0)
        assert out.error_status == 503 and "lost the connection to decode" in out.error_message
        assert out.error_origin is None, out
        assert "this worker itself did not run for 5.0 s" in out.error_message, out
    finally:
        worker.close()
