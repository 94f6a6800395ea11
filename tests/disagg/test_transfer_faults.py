"""The KV transport under hostile input and vanished peers: garbage from raw ZeroMQ and raw
TCP sockets is dropped without an exception or a stray write; a gone peer is an error."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import msgspec
import pytest
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import (
    Inbound,
    KVReceived,
    KVTransport,
    PeerLost,
    PeerUnreachable,
    TransportOptions,
    make_transport,
)
from tests.disagg.transfer_peer import make_pool, poll_until, start_peer

POOL_PAGES = 16
PAGE_NBYTES = 1024
GRANTED = [2, 3, 4]


@pytest.fixture
def victim() -> Iterator[KVTransport]:
    transport = make_transport("zmq", make_pool(POOL_PAGES, seed=3), "127.0.0.1")
    yield transport
    transport.close()


@pytest.fixture
def raw_dealer(victim: KVTransport) -> Iterator[zmq.Socket]:
    """A raw ZeroMQ peer that the victim granted pages GRANTED for room 1."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(victim.endpoint)
    sock.send(m.encode(m.Ping(seq=1)))
    (hello,) = poll_until(victim, lambda ev: len(ev) >= 1)
    victim.send(hello.peer, m.PageList(room=1, dst_page_ids=GRANTED, prompt_len=3))
    assert sock.poll(5000) and m.decode(sock.recv()) == m.PageList(
        room=1, dst_page_ids=GRANTED, prompt_len=3
    )
    yield sock
    ctx.destroy(linger=0)


def header(dst: list[int], counts: list[int], room: int = 1, page_nbytes: int = PAGE_NBYTES):
    return m.encode(
        m.KVHeader(room=room, frame_page_counts=counts, page_nbytes=page_nbytes, dst_page_ids=dst)
    )


def page_bytes(num_pages: int, nbytes: int | None = None) -> bytes:
    return os.urandom(num_pages * PAGE_NBYTES if nbytes is None else nbytes)


GARBAGE = {
    "random bytes": [os.urandom(300)],
    "empty frame": [b""],
    "unknown tag": [msgspec.msgpack.encode({"type": "Nope", "room": 1})],
    "not a struct": [msgspec.msgpack.encode([1, 2, 3])],
    "control message with extra frame": [m.encode(m.Ping(seq=2)), b"extra"],
    "page out of range": [header([2, 10_000], [2]), page_bytes(2)],
    "negative page": [header([-1, 2], [2]), page_bytes(2)],
    "page not granted": [header([5, 6], [2]), page_bytes(2)],
    "room not granted": [header([2], [1], room=99), page_bytes(1)],
    "wrong page size": [header([2], [1], page_nbytes=512), page_bytes(1, 512)],
    "short frame": [header([2, 3], [2]), page_bytes(2, 2 * PAGE_NBYTES - 1)],
    "missing frame": [header([2, 3], [1, 1]), page_bytes(1)],
    "counts do not cover pages": [header([2, 3], [1]), page_bytes(1)],
    "zero-page frame": [header([], [0]), b""],
    "header without frames": [header([2], [1])],
    "bad header fields": [msgspec.msgpack.encode({"type": "KVHeader", "room": "x"}), b"1"],
}


def test_garbage_from_a_raw_zmq_peer_is_counted_and_dropped(
    victim: KVTransport, raw_dealer: zmq.Socket
) -> None:
    before = victim.pool.clone()
    for frames in GARBAGE.values():
        raw_dealer.send_multipart(frames)
    raw_dealer.send(m.encode(m.Ping(seq=3)))  # in order after the garbage: all of it was read
    events = poll_until(victim, lambda ev: any(e.msg == m.Ping(seq=3) for e in ev))
    assert [e.msg for e in events] == [m.Ping(seq=3)]
    dropped = sum(n for key, n in victim.stats.items() if key.startswith("dropped_"))
    assert dropped == len(GARBAGE)
    assert torch.equal(victim.pool, before)

    # The same peer can still write the pages it was granted.
    payload = make_pool(2, seed=9)
    raw_dealer.send_multipart([header([4, 2], [2]), payload.numpy().tobytes()])
    raw_dealer.send(m.encode(m.RoomStatus(room=1, ok=True)))
    events = poll_until(victim, lambda ev: any(isinstance(e, KVReceived) for e in ev))
    assert events[0] == KVReceived(events[0].peer, 1, 2, 2 * PAGE_NBYTES, 3)
    assert torch.equal(victim.pool[[4, 2]], payload)
    assert torch.equal(
        victim.pool[[0, 1, 3, *range(5, POOL_PAGES)]], before[[0, 1, 3, *range(5, POOL_PAGES)]]
    )


def test_oversized_and_raw_tcp_garbage_leave_the_transport_working(victim: KVTransport) -> None:
    before = victim.pool.clone()
    host, port = victim.endpoint.removeprefix("tcp://").rsplit(":", 1)
    for junk in (os.urandom(4096), b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" + os.urandom(2000)):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(junk)
            victim.poll(50)
    ctx = zmq.Context()
    try:
        big = ctx.socket(zmq.DEALER)
        big.connect(victim.endpoint)
        big.send(bytes(70 << 20))  # over the receive bound: ZeroMQ drops the connection
        victim.poll(200)
    finally:
        ctx.destroy(linger=0)
    assert torch.equal(victim.pool, before)

    # A proper peer still gets its pages written afterwards.
    sender = make_transport("zmq", make_pool(POOL_PAGES, seed=4), None)
    try:
        peer = sender.connect(victim.endpoint)
        sender.send(peer, m.Ping(seq=1))
        (hello,) = poll_until(victim, lambda ev: len(ev) >= 1)
        victim.send(hello.peer, m.PageList(room=8, dst_page_ids=[9, 1], prompt_len=2))
        poll_until(sender, lambda ev: len(ev) >= 1)
        handle = sender.send_kv(peer, 8, [5, 6], [9, 1], m.RoomStatus(room=8, ok=True))
        poll_until(
            victim,
            lambda ev: any(isinstance(e.msg, m.RoomStatus) for e in ev if isinstance(e, Inbound)),
        )
        poll_until(sender, lambda ev: handle.done())
        assert handle.error is None
        assert torch.equal(victim.pool[[9, 1]], make_pool(POOL_PAGES, seed=4)[[5, 6]])
    finally:
        sender.close()


def test_send_to_a_killed_decode_process_raises_peer_unreachable(victim: KVTransport) -> None:
    with start_peer("--connect", victim.endpoint) as (proc, _):
        (hello,) = poll_until(victim, lambda ev: len(ev) >= 1)
        victim.send(hello.peer, m.Pong(seq=1))  # reachable while it lives
        proc.kill()
        proc.wait(timeout=10)

    def send_fails() -> bool:
        try:
            victim.send(hello.peer, m.Pong(seq=2))
        except PeerUnreachable:
            return True
        return False

    poll_until(victim, lambda _: send_fails())
    with pytest.raises(PeerUnreachable):
        victim.send_kv(hello.peer, 1, [0], [0], m.RoomStatus(room=1, ok=True))
    with pytest.raises(PeerUnreachable):
        victim.send("kv-never-connected", m.Ping(seq=1))


def test_queued_kv_for_a_vanished_peer_fails_its_handle_and_reports_peer_lost() -> None:
    # Small frames and high-water marks so most of the payload waits in the outbox.
    options = TransportOptions(frame_nbytes=64 << 10, send_hwm_msgs=1, recv_hwm_msgs=1)
    big_pages = (48, 1 << 18)  # 48 pages of 1 MiB in fp32
    sender = make_transport("zmq", torch.zeros(big_pages), "127.0.0.1", options=options)
    receiver = make_transport("zmq", torch.zeros(big_pages), None, options=options)
    try:
        peer = receiver.connect(sender.endpoint)
        receiver.send(peer, m.PageList(room=1, dst_page_ids=list(range(48)), prompt_len=1))
        (page_list,) = poll_until(sender, lambda ev: len(ev) >= 1)
        handle = sender.send_kv(
            page_list.peer, 1, list(range(48)), list(range(48)), m.RoomStatus(room=1, ok=True)
        )
        sender.poll(50)  # the receiver does not poll: the payload backs up
        assert sender.busy() and not handle.done()
        receiver.close()
        events = poll_until(sender, lambda ev: any(isinstance(e, PeerLost) for e in ev))
        assert [e.peer for e in events if isinstance(e, PeerLost)] == [page_list.peer]
        assert handle.error is not None
        poll_until(sender, lambda _: handle.done())
    finally:
        receiver.close()
        sender.close()


def test_a_peer_reconnecting_under_its_routing_id_takes_over_its_stale_connection(
    victim: KVTransport,
) -> None:
    """A decode worker's connection to a stopped prefill worker dropped (missed heartbeats)
    and ZeroMQ connected again under the same routing id, which prefill's ROUTER accepted
    when it ran again while the old connection was still listed there. Refused as a
    duplicate, the new connection stayed up (its heartbeats answered) but prefill could not
    answer on it: every later KV handshake of that pair timed out, for good (a blame audit
    with SIGSTOPped prefill workers). The new connection must take the routing id over."""
    ctx = zmq.Context()
    assert victim.endpoint is not None

    def decode_side() -> zmq.Socket:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"kv-decode")  # fixed for a socket's life
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, victim.endpoint.encode())
        sock.connect(victim.endpoint)
        return sock

    def ping_answered(sock: zmq.Socket, seq: int) -> bool:
        sock.send_multipart([victim.endpoint.encode(), m.encode(m.Ping(seq=seq))])
        (ping,) = poll_until(victim, lambda ev: any(isinstance(e, Inbound) for e in ev), 5)
        try:
            victim.send(ping.peer, m.Ping(seq=seq + 1))
        except PeerUnreachable:
            return False
        return bool(sock.poll(5000)) and m.decode(sock.recv_multipart()[1]) == m.Ping(seq + 1)

    try:
        old = decode_side()
        assert ping_answered(old, 1)
        new = decode_side()  # the reconnect, while the old connection is still listed
        assert new.poll(200) == 0  # a moment for ZeroMQ to attach it: nothing comes
        old.close()
        assert ping_answered(new, 3)
    finally:
        ctx.destroy(linger=0)
