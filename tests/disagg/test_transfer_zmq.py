"""The KV transport between two real processes over loopback TCP: a prefill-like peer process
(tests/disagg/transfer_peer.py) and a decode-side transport in this process. A decode side
that handshakes gets its pages on the raw TCP data connection; one that does not, as ZeroMQ
frames: both paths are tested."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import (
    Event,
    Inbound,
    KVReceived,
    KVTransport,
    TransportOptions,
    make_transport,
)
from tests.disagg.transfer_peer import (
    LAYOUT,
    PAGE_SHAPE,
    make_pool,
    poll_until,
    source_pages,
    start_peer,
)
from tests.helpers import ipv6_loopback_missing

POOL_PAGES = 64
PAGE_NBYTES = 1024  # PAGE_SHAPE in fp32
SENTINEL = -1.0


@pytest.fixture(scope="module")
def zmq_peer() -> Iterator[str]:
    # 4 pages of 1 KiB per message, so a 10-page room takes three messages; source runs of
    # 2+ pages on average go zero-copy (one part per run), shorter ones are gathered.
    with start_peer("--listen", "--pool-pages", str(POOL_PAGES), "--frame-nbytes", "4096") as (
        _,
        endpoint,
    ):
        yield endpoint


PATHS = ["data connection", "zeromq frames"]


def decode_side(backend: str) -> tuple[KVTransport, torch.Tensor]:
    pool = torch.full((POOL_PAGES, *PAGE_SHAPE), SENTINEL)
    # Destination runs of 2+ pages on average are read straight into the pool, shorter ones
    # through a buffer and one scatter.
    options = TransportOptions(zero_copy_min_nbytes=2 * PAGE_NBYTES)
    return make_transport(backend, pool, None, options=options), pool


def connect(transport: KVTransport, endpoint: str, path: str) -> str:
    """Connect; over the data connection, handshake first (it opens with the handshake)."""
    peer = transport.connect(endpoint)
    if path == "data connection":
        transport.send(peer, m.Handshake(decode_id="d0", layout=LAYOUT))
        poll_until(
            transport, lambda ev: msgs(ev, m.HandshakeResult) == [m.HandshakeResult(ok=True)]
        )
    return peer


def msgs(events: list[Event], kind: type) -> list:
    return [e.msg for e in events if isinstance(e, Inbound) and isinstance(e.msg, kind)]


def finished_rooms(events: list[Event]) -> set[int]:
    """Rooms with a RoomStatus here and a completed SendHandle on the peer (its Pong)."""
    statuses = {s.room for s in msgs(events, m.RoomStatus)}
    return statuses & {p.seq for p in msgs(events, m.Pong)}


def test_control_messages_round_trip(zmq_peer: str) -> None:
    transport, _ = decode_side("zmq")
    try:
        peer = transport.connect(zmq_peer)
        assert transport.connect(zmq_peer) == peer  # idempotent
        transport.send(peer, m.Handshake(decode_id="d0", layout=LAYOUT))
        transport.send(peer, m.Ping(seq=41))
        events = poll_until(transport, lambda ev: len(ev) >= 2)
        assert [e.msg for e in events] == [m.HandshakeResult(ok=True), m.Pong(seq=41)]
        assert all(e.peer == peer for e in events)
    finally:
        transport.close()


@pytest.mark.parametrize("path", PATHS)
def test_an_endpoint_dialed_again_at_once_after_a_disconnect_is_a_new_peer(
    zmq_peer: str, path: str
) -> None:
    """libzmq aborts the process when a connection's alias is reused while the old
    connection's pipe still closes: a redial takes another PeerId, and works."""
    transport, _ = decode_side("zmq")
    try:
        peers = []
        for seq in range(3):
            peer = connect(transport, zmq_peer, path)
            transport.send(peer, m.Ping(seq=seq))
            events = poll_until(transport, lambda ev, s=seq: m.Pong(seq=s) in msgs(ev, m.Pong))
            assert {e.peer for e in events if isinstance(e, Inbound)} == {peer}
            transport.disconnect(peer)
            peers.append(peer)
        assert peers[0] == zmq_peer and len(set(peers)) == 3
    finally:
        transport.close()


@pytest.mark.parametrize("path", PATHS)
def test_pages_land_bit_exact_in_scattered_destination_and_nowhere_else(
    zmq_peer: str, path: str
) -> None:
    transport, pool = decode_side("zmq")
    # Sources (transfer_peer.source_pages): room 3 one run, room 4 scattered pages (gathered),
    # room 5 scattered pairs (zero-copy parts). Destinations mix runs and single pages: rooms 3
    # and 4 come through the receive buffer, room 5 straight into the pool.
    dst_by_room = {
        3: [50, 3, 17, 4, 5, 6, 40, 41, 9, 60],
        4: [0, 63, 31, 30, 29, 12, 13, 1],
        5: [20, 21, 22, 23, 24, 25, 26, 27, 2, 36, 35],
    }
    try:
        peer = connect(transport, zmq_peer, path)
        for room, dst in dst_by_room.items():
            transport.send(peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=len(dst)))
        events = poll_until(transport, lambda ev: finished_rooms(ev) == set(dst_by_room))
        stats = transport.stats
    finally:
        transport.close()

    total_nbytes = sum(len(dst) for dst in dst_by_room.values()) * PAGE_NBYTES
    assert stats["kv_bytes_in"] == total_nbytes
    assert stats.get("data_kv_bytes_in", 0) == (total_nbytes if path == PATHS[0] else 0)
    sender_pool = make_pool(POOL_PAGES, seed=1)
    touched = torch.zeros(POOL_PAGES, dtype=torch.bool)
    for room, dst in dst_by_room.items():
        src = source_pages(room, len(dst), POOL_PAGES)
        assert torch.equal(pool[dst], sender_pool[src]), f"room {room}: wrong bytes"
        touched[dst] = True
        i = next(i for i, e in enumerate(events) if isinstance(e, KVReceived) and e.room == room)
        assert events[i] == KVReceived(peer, room, len(dst), len(dst) * PAGE_NBYTES, len(dst))
        assert events[i + 1].msg.room == room and events[i + 1].msg.ok  # its RoomStatus next
    assert bool((pool[~touched] == SENTINEL).all()), "a page outside the PageLists changed"


@pytest.mark.parametrize("path", PATHS)
def test_kv_arriving_after_abort_is_dropped_not_written(zmq_peer: str, path: str) -> None:
    transport, pool = decode_side("zmq")
    try:
        peer = connect(transport, zmq_peer, path)
        transport.send(peer, m.PageList(room=6, dst_page_ids=[7, 8, 9], prompt_len=3))
        transport.send(peer, m.Abort(room=6, reason="decode deadline"))  # the peer ignores it
        events = poll_until(transport, lambda ev: finished_rooms(ev) == {6})
        assert not [e for e in events if isinstance(e, KVReceived)]
        assert transport.stats["dropped_kv_no_grant"] >= 1
        assert bool((pool == SENTINEL).all())
    finally:
        transport.close()


def test_fake_backend_moves_control_messages_but_no_bytes() -> None:
    with start_peer("--listen", "--backend", "fake", "--pool-pages", str(POOL_PAGES)) as (
        _,
        endpoint,
    ):
        transport, pool = decode_side("fake")
        try:
            peer = transport.connect(endpoint)
            transport.send(peer, m.Ping(seq=5))
            transport.send(peer, m.PageList(room=6, dst_page_ids=[1, 5, 2], prompt_len=3))
            events = poll_until(transport, lambda ev: finished_rooms(ev) == {6})
        finally:
            transport.close()
    assert KVReceived(peer, 6, 3, 0, 3) in events
    assert m.Pong(seq=5) in msgs(events, m.Pong)
    assert bool((pool == SENTINEL).all())


@pytest.mark.skipif(ipv6_loopback_missing() is not None, reason=str(ipv6_loopback_missing()))
def test_a_prefill_side_on_ipv6_advertises_a_bracketed_endpoint_and_sends_on_its_data_port():
    """A prefill transport listening on ::1 (its ZeroMQ bind took "tcp://::1:*" as no device)."""
    prefill = make_transport("zmq", make_pool(POOL_PAGES, seed=1), "::1")
    decode, pool = decode_side("zmq")

    def decode_until(kind: type) -> list[Event]:  # prefill, in this process too, kept moving
        return poll_until(decode, lambda ev: msgs(ev, kind) or prefill.poll(0) and False)

    try:
        assert prefill.endpoint is not None and prefill.endpoint.startswith("tcp://[::1]:")
        peer = decode.connect(prefill.endpoint)
        decode.send(peer, m.Handshake(decode_id="d0", layout=LAYOUT))
        events = poll_until(prefill, lambda ev: msgs(ev, m.Handshake))
        (handshake,) = [e for e in events if isinstance(e, Inbound)]
        prefill.send(handshake.peer, m.HandshakeResult(ok=True))
        decode_until(m.HandshakeResult)
        decode.send(peer, m.PageList(room=5, dst_page_ids=[9, 1], prompt_len=2))
        events = poll_until(prefill, lambda ev: msgs(ev, m.PageList))
        (page_list,) = [e for e in events if isinstance(e, Inbound)]
        prefill.send_kv(page_list.peer, 5, [3, 4], [9, 1], m.RoomStatus(room=5, ok=True))
        decode_until(m.RoomStatus)
        assert torch.equal(pool[[9, 1]], prefill.pool[[3, 4]])
        assert decode.stats["data_kv_bytes_in"] == 2 * PAGE_NBYTES  # the raw TCP port, on ::1
    finally:
        decode.close()
        prefill.close()
