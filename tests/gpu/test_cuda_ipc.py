"""The cuda_ipc KV transport between two real processes on one GPU: granted pages arrive
byte-exact in scattered slots, nothing else in the pool changes, and a copy for a room whose
grant was revoked (abort) is refused without writing."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from pdserve.bench.gpu_transfer_bench import (  # noqa: E402
    PAGE_SHAPE,
    Receiver,
    make_pool,
    sender_main,
    src_pages_for,
)
from pdserve.disagg import messages as m  # noqa: E402
from pdserve.disagg.transfer.base import KVReceived  # noqa: E402

POOL_PAGES = 24
START_TIMEOUT_S = 120.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sender = ctx.Process(target=sender_main, args=(child, POOL_PAGES, 7), daemon=True)
    sender.start()
    try:
        assert parent.poll(START_TIMEOUT_S), "the prefill-side process did not start"
        pool = torch.full((POOL_PAGES, *PAGE_SHAPE), -1, dtype=torch.int16, device="cuda")
        rx = Receiver(pool, parent.recv())
        yield rx
        rx.transport.close()
    finally:
        parent.send("stop")
        sender.join(30)
        if sender.is_alive():
            sender.kill()


def test_granted_pages_arrive_exactly_and_nothing_else_changes(receiver):
    before = receiver.pool.clone()
    (room, dst), *_ = receiver.transfer(num_pages=9, num_rooms=1)
    expected = make_pool(POOL_PAGES, 7)[src_pages_for(room, 9, POOL_PAGES)]
    assert torch.equal(receiver.pool[dst], expected)
    untouched = [p for p in range(POOL_PAGES) if p not in dst]
    assert torch.equal(receiver.pool[untouched], before[untouched])
    assert receiver.transport.stats["kv_bytes_in"] == 9 * receiver.transport.page_nbytes


def test_copy_for_an_aborted_room_is_refused_and_writes_nothing(receiver):
    before = receiver.pool.clone()
    rx = receiver.transport
    rx.send(receiver.peer, m.PageList(room=99, dst_page_ids=[1, 2, 3], prompt_len=1))
    rx.send(receiver.peer, m.Abort(room=99, reason="client went away"))  # revokes the grant
    deadline = time.monotonic() + 60
    while not rx.stats.get("dropped_ipc_no_grant"):
        assert time.monotonic() < deadline, f"the refused copy never came: {rx.stats}"
        events = rx.poll(5)
        assert not any(isinstance(e, KVReceived) for e in events)
    torch.cuda.synchronize()
    assert torch.equal(receiver.pool, before)
    # the transport still works for the next room
    (room, dst), *_ = receiver.transfer(num_pages=2, num_rooms=1)
    assert torch.equal(
        receiver.pool[dst], make_pool(POOL_PAGES, 7)[src_pages_for(room, 2, POOL_PAGES)]
    )
