"""An abort that reaches the prefill worker after its room's KV send has finished, before
the worker's loop looked at the send: the room is a success (decode has its KV and its "ok"
status), answered with the transfer's figures, not failed as aborted with its bytes
uncounted. A real engine (tiny-random), the worker's hooks and a decode-side transport, over
loopback."""

from __future__ import annotations

import time

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.prefill_worker import PrefillWorkerHooks
from pdserve.disagg.rooms import RoomState
from pdserve.disagg.transfer import Inbound
from pdserve.disagg.transfer.zmq.transport import ZmqTransport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq
from tests.disagg.transfer_peer import poll_until, worker_turn

PROMPT_LEN = 40


def test_an_abort_after_the_send_finished_answers_the_room_as_sent() -> None:
    engine = Engine.from_config(EngineConfig(model_path="tiny-random", page_size=16))
    transport = ZmqTransport(engine.kv_pool, listen_host="127.0.0.1")
    hooks = PrefillWorkerHooks(engine, DisaggConfig(), transport, dp_rank=0)
    decode = ZmqTransport(torch.zeros(engine.kv_pool.shape[0], transport.page_nbytes // 4))
    try:
        peer = decode.connect(transport.endpoint)
        decode.send(peer, m.Handshake(decode_id="d", layout=engine.kv_layout()))
        num_pages = -(-PROMPT_LEN // 16)
        prompt = [(7 * i) % 400 + 10 for i in range(PROMPT_LEN)]
        decode.send(
            peer,
            m.PageList(
                room=1,
                dst_page_ids=list(range(num_pages)),
                prompt_len=PROMPT_LEN,
                prompt_digest=prompt_digest(prompt),
            ),
        )
        poll_until(decode, lambda _: not decode.busy())
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
        hooks.on_generate(
            GenerateReq(rid="r1", input_ids=prompt, sampling=sampling, disagg=DisaggInfo(room=1))
        )
        deadline = time.monotonic() + 120
        while not (1 in hooks.rooms and hooks.rooms[1].state is RoomState.TRANSFERRING):
            assert time.monotonic() < deadline, "never sent"
            worker_turn(engine, hooks)
        # The transport finishes the send; the worker's loop has not looked at it yet.
        handle = hooks.rooms[1].send_handle
        events: list = []
        while not handle.done():
            assert time.monotonic() < deadline, "the send never finished"
            assert transport.poll(5) == []
            events += decode.poll(5)

        (answer,) = hooks.on_abort("r1", "client gone")
        assert answer.finish_reason is not None and answer.finish_reason.type == "length"
        assert answer.kv_bytes == num_pages * transport.page_nbytes
        assert not hooks.rooms and not hooks.room_of_rid
        events += poll_until(decode, lambda ev: any(_statuses(events + ev)), 20)
    finally:
        decode.close()
        hooks.close()
    assert [s.ok for s in _statuses(events)] == [True]  # no failure after the "ok"


def _statuses(events: list) -> list[m.RoomStatus]:
    return [e.msg for e in events if isinstance(e, Inbound) and isinstance(e.msg, m.RoomStatus)]
