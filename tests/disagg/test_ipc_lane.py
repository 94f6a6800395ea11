"""The cuda_ipc transport's control lane (Unix datagram sockets, real ones, in this process):
messages arrive whole and in order, wait while the peer's queue is full, a vanished peer is
reported, and garbage resets only the stream it came on."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from pdserve.disagg.transfer.ipc_lane import (
    CHUNK_NBYTES,
    Lane,
    LaneGone,
    lane_address,
    owner_of,
)


def new_lane() -> Lane:
    return Lane(f"kv-{uuid.uuid4().hex}")


@pytest.fixture
def lanes() -> Iterator[tuple[Lane, Lane]]:
    a, b = new_lane(), new_lane()
    yield a, b
    a.close()
    b.close()


def receive_all(lane: Lane, count: int) -> list[tuple[bytes, bytes]]:
    """Everything that already arrived (datagrams are queued in the kernel on send)."""
    got = lane.receive()
    assert len(got) == count, f"{len(got)} of {count} messages"
    return got


def test_messages_arrive_whole_and_in_order_with_the_sender_named(lanes):
    a, b = lanes
    big = bytes(range(256)) * (3 * CHUNK_NBYTES // 256 + 7)  # several datagrams
    payloads = [b"first", big, b"", b"last"]
    for payload in payloads:
        a.send(b.address, payload)
    got = receive_all(b, len(payloads))
    assert [p for _, p in got] == payloads
    assert {addr for addr, _ in got} == {a.address}
    assert owner_of(a.address).startswith("kv-")
    assert a.queued_nbytes() == 0


def test_a_full_peer_queue_holds_messages_here_until_it_reads(lanes):
    a, b = lanes
    payloads = [i.to_bytes(4, "little") * 8192 for i in range(200)]  # 32 KiB each
    for payload in payloads:
        a.send(b.address, payload)
    assert a.queued_nbytes(b.address) > 0, "the kernel took 6 MiB unread: no backpressure"
    got: list[bytes] = []
    for _ in range(1000):
        got += [p for _, p in b.receive()]
        assert a.flush() == []
        if len(got) == len(payloads):
            break
    assert got == payloads
    assert a.queued_nbytes() == 0


def test_a_vanished_peer_is_reported_and_forgotten(lanes):
    a, b = lanes
    gone = lane_address(f"kv-{uuid.uuid4().hex}")
    with pytest.raises(LaneGone):
        a.send(gone, b"hello")
    assert a.queued_nbytes() == 0
    b.close()
    with pytest.raises(LaneGone):
        a.send(b.address, b"hello")
    assert a.flush() == []


def test_garbage_resets_its_stream_and_a_new_sender_is_read_from_scratch(lanes):
    a, b = lanes
    a.send(b.address, b"before")
    assert [p for _, p in b.receive()] == [b"before"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anonymous:
        anonymous.sendto(b"\x01" * 40, b.address)  # unbound: no sender address
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rogue.bind(lane_address(f"kv-{uuid.uuid4().hex}"))
    rogue.sendto(b"\x00" * 8 + b"\xff" * 32, b.address)  # a length prefix far too long
    rogue.sendto(b"\x00" * 8 + (5).to_bytes(4, "little") + b"hi", b.address)  # incomplete
    assert b.receive() == []
    assert b.stats["dropped_lane_anonymous"] == 1
    assert b.stats["dropped_lane_framing"] == 1
    rogue.sendto(b"\x07" * 8 + (2).to_bytes(4, "little") + b"ok", b.address)  # new incarnation
    assert b.receive() == [(rogue.getsockname(), b"ok")]
    rogue.close()
    a.send(b.address, b"after")
    assert [p for _, p in b.receive()] == [b"after"]


def test_long_owner_ids_get_a_hashed_name_that_names_nobody():
    endpoint = "tcp://" + "h" * 120 + ":5555"
    address = lane_address(endpoint)
    assert len(address) < 108 and owner_of(address) is None
    assert owner_of(lane_address("tcp://127.0.0.1:5555")) == "tcp://127.0.0.1:5555"
    first = Lane(endpoint)
    try:
        with pytest.raises(ValueError, match="cannot bind"):
            Lane(endpoint)  # one lane per owner on a host
    finally:
        first.close()
