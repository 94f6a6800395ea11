"""The cuda_ipc KV transport between two real processes on one GPU, with control messages on
its Unix datagram lane and on ZeroMQ, with copies launched through Triton's JIT instead of
directly, and with completion slots too small for a status (it then comes as a message):
granted pages arrive byte-exact in scattered slots, nothing else in the pool changes,
prefill writes nothing for a room whose grant was revoked (abort), also among rooms that
land, and a prefill side that dies is reported at once."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

import msgspec
import pytest
import torch

pytest.importorskip("triton")

from pdserve.bench.gpu_transfer_bench import (  # noqa: E402
    CONTROLS,
    PAGE_SHAPE,
    Receiver,
    make_pool,
    sender_main,
    src_pages_for,
)
from pdserve.disagg import messages as m  # noqa: E402
from pdserve.disagg.transfer.base import (  # noqa: E402
    KVReceived,
    PeerLost,
    PeerUnreachable,
    TransportOptions,
)

POOL_PAGES = 24
START_TIMEOUT_S = 120.0


SMALL_SLOTS = TransportOptions(ipc_status_nbytes=64)  # every status follows as a message
# Each control channel of the bench, copies launched directly or through Triton's JIT
# (`hot-jit`), and slots too small for a status.
SETUPS = {**CONTROLS, "small-slots": (SMALL_SLOTS, True)}


@dataclass
class Pair:
    receiver: Receiver
    sender: mp.Process
    conn: Connection  # to the sender process

    @contextmanager
    def sender_held(self, aborted_room: int) -> Iterator[None]:
        """The prefill side reads nothing until the block ends, then reads until the
        block's Abort of `aborted_room` came before it sends any KV: the Abort ends that
        room's grant first, whichever control channel carries the messages."""
        self.conn.send("hold")
        while True:  # (room, called, returned) reports may come before the answer
            assert self.conn.poll(START_TIMEOUT_S), "the prefill side did not hold"
            if self.conn.recv() == "held":
                break
        try:
            yield
        finally:
            self.conn.send(("go", aborted_room))


@pytest.fixture(params=["lane", "zmq", "hot-jit", "small-slots"])
def pair(request) -> Iterator[Pair]:
    """The decode side here, the prefill side in a spawned process, over one control channel."""
    options, direct = SETUPS[request.param]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (child, POOL_PAGES, 7, options, direct)
    sender = ctx.Process(target=sender_main, args=args, daemon=True)
    sender.start()
    try:
        assert parent.poll(START_TIMEOUT_S), "the prefill-side process did not start"
        pool = torch.full((POOL_PAGES, *PAGE_SHAPE), -1, dtype=torch.int16, device="cuda")
        rx = Receiver(pool, parent.recv(), options)
        yield Pair(rx, sender, parent)
        rx.transport.close()
    finally:
        parent.send("stop")
        sender.join(30)
        if sender.is_alive():
            sender.kill()


@pytest.fixture
def receiver(pair) -> Receiver:
    return pair.receiver


def test_granted_pages_arrive_exactly_and_nothing_else_changes(receiver):
    before = receiver.pool.clone()
    (room, dst), *_ = receiver.transfer(num_pages=9, num_rooms=1)
    expected = make_pool(POOL_PAGES, 7)[src_pages_for(room, 9, POOL_PAGES)]
    assert torch.equal(receiver.pool[dst], expected)
    untouched = [p for p in range(POOL_PAGES) if p not in dst]
    assert torch.equal(receiver.pool[untouched], before[untouched])
    assert receiver.transport.stats["kv_bytes_in"] == 9 * receiver.transport.page_nbytes


def test_an_aborted_room_gets_no_write_and_its_slot_is_set_from_the_host(pair):
    receiver = pair.receiver
    before = receiver.pool.clone()
    rx = receiver.transport
    with pair.sender_held(aborted_room=99):
        rx.send(receiver.peer, m.PageList(room=99, dst_page_ids=[1, 2, 3], prompt_len=1))
        rx.send(receiver.peer, m.Abort(room=99, reason="client went away"))  # revokes the grant
    deadline = time.monotonic() + 60
    while not rx.stats.get("ipc_grants_dropped"):
        assert time.monotonic() < deadline, f"the grant never ended: {rx.stats}"
        events = rx.poll(5)
        assert not any(isinstance(e, KVReceived) for e in events)
    torch.cuda.synchronize()
    assert torch.equal(receiver.pool, before)
    # the transport still works for the next room
    (room, dst), *_ = receiver.transfer(num_pages=2, num_rooms=1)
    assert torch.equal(
        receiver.pool[dst], make_pool(POOL_PAGES, 7)[src_pages_for(room, 2, POOL_PAGES)]
    )


def wait_received(rx, rooms: set[int], until=lambda: True) -> dict[int, KVReceived]:
    received: dict[int, KVReceived] = {}
    deadline = time.monotonic() + 60
    while set(received) != rooms or not until():
        assert time.monotonic() < deadline, f"rooms missing: {received}, {rx.stats}"
        received |= {e.room: e for e in rx.poll(5) if isinstance(e, KVReceived)}
    torch.cuda.synchronize()
    return received


def test_rooms_in_flight_together_all_land_exactly(receiver):
    rx, peer = receiver.transport, receiver.peer
    pages = torch.randperm(POOL_PAGES, generator=torch.Generator().manual_seed(3)).tolist()
    grants = {room: pages[3 * i : 3 * i + 3] for i, room in enumerate(range(50, 56))}
    for room, dst in grants.items():  # all granted before any arrives
        rx.send(peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=1))
    received = wait_received(rx, set(grants))
    assert all(e.complete for e in received.values())
    source = make_pool(POOL_PAGES, 7)
    for room, dst in grants.items():
        assert torch.equal(receiver.pool[dst], source[src_pages_for(room, 3, POOL_PAGES)])
    assert rx.stats["kv_bytes_in"] == 18 * rx.page_nbytes


def test_an_aborted_room_between_granted_ones_gets_no_write_and_only_it(pair):
    receiver = pair.receiver
    before = receiver.pool.clone()
    rx, peer = receiver.transport, receiver.peer
    grants = {98: [0, 5, 9], 99: [1, 2, 3], 100: [20, 4]}
    with pair.sender_held(aborted_room=99):
        for room, dst in grants.items():
            rx.send(peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=1))
        rx.send(peer, m.Abort(room=99, reason="client went away"))
    received = wait_received(rx, {98, 100}, until=lambda: rx.stats.get("ipc_grants_dropped"))
    assert all(e.complete for e in received.values())
    source = make_pool(POOL_PAGES, 7)
    for room in (98, 100):
        dst = grants[room]
        assert torch.equal(receiver.pool[dst], source[src_pages_for(room, len(dst), POOL_PAGES)])
    untouched = [p for p in range(POOL_PAGES) if p not in grants[98] + grants[100]]
    assert torch.equal(receiver.pool[untouched], before[untouched])


def test_a_prefill_side_that_dies_is_lost_and_the_next_grant_fails(pair):
    receiver, sender = pair.receiver, pair.sender
    rx, peer = receiver.transport, receiver.peer
    receiver.transfer(num_pages=1, num_rooms=1)  # the channel is up
    sender.kill()
    sender.join(30)
    deadline = time.monotonic() + 60  # ZeroMQ reports the closed connection on its own
    lost = False
    while not lost:
        assert time.monotonic() < deadline, "the dead peer was never reported"
        try:
            rx.send(peer, m.PageList(room=7, dst_page_ids=[1], prompt_len=1))
        except PeerUnreachable:
            break
        lost = any(isinstance(e, PeerLost) and e.peer == peer for e in rx.poll(5))
    assert not rx.busy()


def test_a_prefill_that_cannot_map_the_decode_side_fails_the_room_at_once(receiver):
    """The completion slots are opened through /proc (one PID namespace): where that fails,
    prefill answers each grant with the reason, so decode does not wait for its deadline."""
    rx = receiver.transport
    target = rx._target
    rx._target = lambda board: msgspec.structs.replace(target(board), slots_fd=1 << 20)
    rx.send(receiver.peer, m.PageList(room=77, dst_page_ids=[1, 2], prompt_len=1))
    deadline = time.monotonic() + 60
    statuses: list = []
    while not statuses:
        assert time.monotonic() < deadline, f"no answer: {rx.stats}"
        events = rx.poll(5)
        assert not any(isinstance(e, KVReceived) for e in events)
        statuses = [e.msg for e in events if isinstance(getattr(e, "msg", None), m.RoomStatus)]
    (status,) = statuses
    assert not status.ok and status.error_status == 503 and "could not map" in status.error


def test_pages_granted_to_a_replaced_prefill_process_are_freed_without_waiting_for_expiry(
    pair, monkeypatch
):
    """A prefill process restarted at the same address handshakes as another instance: the
    pages of a forgotten room granted to the one before are settled then (after the grace a
    dead context gets), not at the grant's expiry, though a lane is bound there again."""
    from pdserve.disagg.transfer import ipc_landing
    from pdserve.disagg.transfer.base import PagesSettled

    monkeypatch.setattr(ipc_landing, "DEAD_GRACE_S", 0.0)
    rx, peer = pair.receiver.transport, pair.receiver.peer

    def settled() -> list[int]:
        return [p for e in rx.poll(5) if isinstance(e, PagesSettled) for p in e.page_ids]

    assert rx.accept_peer_meta(peer, b"a" * 16) is None  # the handshake's instance id
    assert rx.accept_peer_meta(peer, b"short") is not None  # not an instance id: refused
    with pair.sender_held(aborted_room=98):
        rx.send(peer, m.PageList(room=98, dst_page_ids=[4, 5], prompt_len=1))
        assert rx.forget_room(98) == [4, 5]  # held: the process granted them may still write
        assert [settled() for _ in range(3)] == [[], [], []]  # it lives
        assert rx.accept_peer_meta(peer, b"b" * 16) is None  # another process at its address
        assert settled() == [4, 5]
        rx.send(peer, m.Abort(room=98, reason="test over"))  # so the sender writes nothing
