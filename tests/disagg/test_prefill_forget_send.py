"""The prefill worker aborting a room while its KV is still being sent: the engine keeps the
pages the send still reads out of use (another prompt's prefill never gets them) until the
transport settles them; decode never gets the room's "ok"; the pool ends idle. A real engine
(tiny-random), the worker's hooks and a decode-side transport that does not read, over
loopback."""

from __future__ import annotations

import time

import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.prefill_worker import PrefillWorkerHooks
from pdserve.disagg.rooms import RoomState
from pdserve.disagg.transfer import Inbound
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq
from tests.disagg.transfer_peer import SmallBuffers, backed_up_options, poll_until, worker_turn

PROMPT_LEN = 4000  # 4 MiB of fp32 KV
OPTIONS = backed_up_options(data_channel=False)  # the send backs up after a few MiB


def send_stalled(prefill: SmallBuffers, decode: SmallBuffers) -> bool:
    """Nothing of the send ZeroMQ holds can drain any more: decode's queue holds a message
    the test never reads (its I/O thread stops reading at the next), so the TCP buffers
    fill, and prefill's queue is full. Until then, a decode I/O thread that ran late could
    still take every frame prefill handed over, and the abort would find none to hold."""
    decode_full = bool(decode._sock.poll(0, zmq.POLLIN))
    return decode_full and not prefill._sock.poll(0, zmq.POLLOUT)


def zmq_holds_pages(prefill: SmallBuffers, room: int) -> bool:
    """ZeroMQ holds a message of the room's send that points into the pool: the precondition
    of what the test checks (the abort keeps those pages). The stalled sockets alone once
    passed with nothing of the room in ZeroMQ's hands (1 CI run in many), and the abort then
    rightly held no page."""
    send = prefill._kv_sends.get(room)
    return send is not None and any(page_ids for _, page_ids in send.in_flight())


def room_statuses(events: list) -> list[m.RoomStatus]:
    return [e.msg for e in events if isinstance(e, Inbound) and isinstance(e.msg, m.RoomStatus)]


def test_an_aborted_room_keeps_the_pages_its_send_reads_until_settled_and_is_never_ok() -> None:
    engine = Engine.from_config(
        EngineConfig(
            model_path="tiny-random", page_size=16, context_length=4096, max_total_tokens=7200
        )
    )
    transport = SmallBuffers(engine.kv_pool, listen_host="127.0.0.1", options=OPTIONS)
    hooks = PrefillWorkerHooks(engine, DisaggConfig(), transport, dp_rank=0)
    page_nbytes = transport.page_nbytes
    decode = SmallBuffers(torch.zeros(engine.kv_pool.shape[0], page_nbytes // 4), options=OPTIONS)
    try:
        peer = decode.connect(transport.endpoint)
        decode.send(peer, m.Handshake(decode_id="d", layout=engine.kv_layout()))
        num_pages = -(-PROMPT_LEN // 16)
        prompt = [(7 * i) % 400 + 10 for i in range(PROMPT_LEN)]
        page_list = m.PageList(
            room=1,
            dst_page_ids=list(range(num_pages)),
            prompt_len=PROMPT_LEN,
            prompt_digest=prompt_digest(prompt),
        )
        decode.send(peer, page_list)
        poll_until(decode, lambda _: not decode.busy())  # both left once connected
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
        answers = hooks.on_generate(
            GenerateReq(rid="r1", input_ids=prompt, sampling=sampling, disagg=DisaggInfo(room=1))
        )
        # The whole test: 10 s alone, over 60 s on a busy 2-core CI machine.
        deadline = time.monotonic() + 180
        while not (1 in hooks.rooms and hooks.rooms[1].state is RoomState.TRANSFERRING):
            assert time.monotonic() < deadline, f"never sent: {answers}"
            answers += worker_turn(engine, hooks)
        src_page_ids = list(hooks.rooms[1].src_page_ids)
        sent_kv = engine.kv_pool[src_page_ids].clone()
        stalled = 0
        while stalled < 3:  # decode reads nothing: the send backs up, and stays so
            assert time.monotonic() < deadline, "the send never backed up"
            worker_turn(engine, hooks)
            holds = zmq_holds_pages(transport, room=1)
            stalled = stalled + 1 if holds and send_stalled(transport, decode) else 0
        assert hooks.rooms[1].state is RoomState.TRANSFERRING

        (answer,) = hooks.on_abort("r1", "client gone")
        assert answer.finish_reason.type == "abort"
        pool = engine.scheduler.pages
        held = pool.set_aside_pages | set(pool.set_aside_pins)
        # What ZeroMQ still reads; the rest went back to the pool (or its cache).
        assert held and held < set(src_page_ids) and engine.num_used_pages == len(held)
        held_rows = [src_page_ids.index(p) for p in sorted(held)]

        # Another prompt needs more pages than are free: it evicts the room's cached pages,
        # never the held ones, which keep the room's KV until they settle.
        other = Request("other", [(11 * i) % 300 + 5 for i in range(PROMPT_LEN)], sampling)
        engine.add_request(other)
        while engine.has_work():
            assert time.monotonic() < deadline, "the other prompt never ran"
            engine.step()
            assert not held & set(other.page_ids)
        assert torch.equal(engine.kv_pool[sorted(held)], sent_kv[held_rows])

        events: list = []
        while engine.num_used_pages or transport.busy() or not room_statuses(events):
            assert time.monotonic() < deadline, f"{engine.num_used_pages} pages never settled"
            events += decode.poll(5)
            worker_turn(engine, hooks)
    finally:
        decode.close()
        hooks.close()
    assert [s.ok for s in room_statuses(events)] == [False]  # never "ok": the failure alone
    got = decode.pool[: len(src_page_ids)]
    arrived = ~(got == 0).all(dim=1)
    assert torch.equal(got[arrived], sent_kv.view(len(src_page_ids), -1)[arrived])
