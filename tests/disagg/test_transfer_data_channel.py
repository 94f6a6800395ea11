"""The KV transport's raw TCP data connection under faults: garbage on the data port, a
garbled or hostile record stream, a grant that ends mid-record, and a peer that dies or
freezes in the middle of a payload. Real processes and sockets over loopback."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import (
    Inbound,
    KVReceived,
    KVTransport,
    PeerId,
    PeerLost,
    TransportOptions,
    make_transport,
)
from pdserve.disagg.transfer.zmq import data_channel as dc
from pdserve.disagg.transfer.zmq.data_records import framed
from tests.disagg.transfer_peer import LAYOUT, make_pool, poll_until, start_peer

POOL_PAGES = 16
PAGE_NBYTES = 1024
BIG_POOL_PAGES = 16 << 10  # 16 MiB of 1 KiB pages: more than loopback buffers while unread


def inbound(events: list, kind: type) -> list:
    return [e.msg for e in events if isinstance(e, Inbound) and isinstance(e.msg, kind)]


def lost(events: list) -> list[PeerLost]:
    return [e for e in events if isinstance(e, PeerLost)]


def poll_both(transport: KVTransport, other: KVTransport, done) -> list:
    """poll_until for `transport` while `other`, in this process too, is kept moving."""
    return poll_until(transport, lambda ev: done(ev) or other.poll(0) and False)


# -- a prefill-side transport here, hostile or dying decode peers ----------------------------
@pytest.fixture
def prefill() -> Iterator[KVTransport]:
    options = TransportOptions(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
    transport = make_transport("zmq", make_pool(POOL_PAGES, seed=3), "127.0.0.1", options=options)
    yield transport
    transport.close()


def offer_to_raw_peer(prefill: KVTransport) -> tuple[zmq.Context, dc.DataOffer]:
    """A raw ZeroMQ peer handshakes; returns the data connection offer it got."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(prefill.endpoint)
    dealer.send(m.encode(m.Handshake(decode_id="raw", layout=LAYOUT)))
    poll_until(prefill, lambda ev: inbound(ev, m.Handshake))
    assert dealer.poll(5000)
    return ctx, dc.decode(dealer.recv())


def test_garbage_on_the_data_port_is_closed_and_counted(prefill: KVTransport) -> None:
    ctx, offer = offer_to_raw_peer(prefill)
    address = ("127.0.0.1", offer.port)
    try:
        with socket.create_connection(address) as idle:  # sends nothing: times out
            for junk in (os.urandom(dc.TOKEN_NBYTES), b"GET / HTTP/1.1\r\n\r\n", b"abc"):
                with socket.create_connection(address) as raw:
                    raw.sendall(junk)
                    prefill.poll(20)
            # The right token, then bytes decode never sends: that channel is closed again.
            with socket.create_connection(address) as raw:
                raw.sendall(offer.token + b"unexpected")
                poll_until(prefill, lambda _: prefill.stats.get("data_channels_opened") == 1)
            poll_until(prefill, lambda _: prefill.stats.get("dropped_data_token_timeout") == 1)
            assert idle.recv(1) == b""  # closed by the prefill side
    finally:
        ctx.destroy(linger=0)
    stats = prefill.stats
    assert stats["dropped_data_bad_token"] == 2
    assert stats["dropped_data_closed_before_token"] == 1

    # A real decode transport still gets its pages over a new data connection.
    decode = make_transport("zmq", torch.zeros(POOL_PAGES, 256), None)
    try:
        peer = decode.connect(prefill.endpoint)
        decode.send(peer, m.Handshake(decode_id="d", layout=LAYOUT))
        (handshake,) = [e for e in poll_until(prefill, lambda ev: ev) if isinstance(e, Inbound)]
        prefill.send(handshake.peer, m.HandshakeResult(ok=True))
        poll_both(decode, prefill, lambda ev: inbound(ev, m.HandshakeResult))
        decode.send(peer, m.PageList(room=5, dst_page_ids=[9, 1], prompt_len=2))
        (page_list,) = poll_until(prefill, lambda ev: ev)
        status = m.RoomStatus(room=5, ok=True)
        prefill.send_kv(page_list.peer, 5, [3, 4], [9, 1], status)
        poll_both(decode, prefill, lambda ev: inbound(ev, m.RoomStatus))
        assert decode.stats["data_kv_bytes_in"] == 2 * PAGE_NBYTES
        assert torch.equal(decode.pool[[9, 1]], prefill.pool[[3, 4]].reshape(2, 256))
    finally:
        decode.close()


def test_a_peer_that_opens_no_data_connection_gets_its_answer_and_kv_over_zeromq(
    prefill: KVTransport,
) -> None:
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(prefill.endpoint)
        dealer.send(m.encode(m.Handshake(decode_id="raw", layout=LAYOUT)))
        (handshake,) = poll_until(prefill, lambda ev: inbound(ev, m.Handshake))
        prefill.send(handshake.peer, m.HandshakeResult(ok=True))  # held for the connection
        assert dealer.poll(5000) and isinstance(dc.decode(dealer.recv()), dc.DataOffer)
        # The offer is ignored: after the hold the answer leaves, and KV goes as frames.
        poll_until(prefill, lambda _: dealer.poll(0))
        assert m.decode(dealer.recv()) == m.HandshakeResult(ok=True)
        handle = prefill.send_kv(handshake.peer, 4, [2], [1], m.RoomStatus(room=4, ok=True))
        poll_until(prefill, lambda _: handle.done())
        header, page = dealer.recv_multipart()
        assert m.decode(header) == m.KVHeader(
            room=4, frame_page_counts=[1], page_nbytes=PAGE_NBYTES, dst_page_ids=[1]
        )
        assert page == prefill.pool[2].numpy().tobytes()
        assert prefill.stats.get("data_channels_opened", 0) == 0
    finally:
        ctx.destroy(linger=0)


def handshake_held(prefill: KVTransport, decode: KVTransport) -> tuple[PeerId, PeerId]:
    """Decode handshakes; prefill answers, and holds the answer for the data connection.
    Returns (decode's id of prefill, prefill's id of decode)."""
    peer = decode.connect(prefill.endpoint)
    decode.send(peer, m.Handshake(decode_id="d", layout=LAYOUT))
    (handshake,) = [e for e in poll_until(prefill, lambda ev: ev) if isinstance(e, Inbound)]
    prefill.send(handshake.peer, m.HandshakeResult(ok=True))
    return peer, handshake.peer


def transfer_two_pages(prefill: KVTransport, decode: KVTransport, peer: PeerId) -> list:
    """Room 5: prefill's pages 3 and 4 into decode's 9 and 1; decode's events until its status."""
    decode.send(peer, m.PageList(room=5, dst_page_ids=[9, 1], prompt_len=2))
    (page_list,) = poll_until(prefill, lambda ev: ev)
    prefill.send_kv(page_list.peer, 5, [3, 4], [9, 1], m.RoomStatus(room=5, ok=True))
    events = poll_both(decode, prefill, lambda ev: inbound(ev, m.RoomStatus) or lost(ev))
    assert torch.equal(decode.pool[[9, 1]], prefill.pool[[3, 4]].reshape(2, 256))
    return events


def test_a_data_connection_that_came_while_prefill_computed_past_the_hold_is_used(
    prefill: KVTransport,
) -> None:
    decode = make_transport("zmq", torch.zeros(POOL_PAGES, 256), None)
    try:
        peer, _ = handshake_held(prefill, decode)
        # Decode connects and writes its token: both wait in prefill's kernel buffers...
        poll_until(decode, lambda _: decode.stats.get("data_channels_opened") == 1)
        time.sleep(prefill.options.heartbeat_timeout_s)  # ...while prefill computes past its hold
        events = poll_both(decode, prefill, lambda ev: inbound(ev, m.HandshakeResult) or lost(ev))
        assert not lost(events)
        assert prefill.stats.get("data_channels_opened") == 1
        assert not lost(transfer_two_pages(prefill, decode, peer))
        assert decode.stats["data_kv_bytes_in"] == 2 * PAGE_NBYTES
    finally:
        decode.close()


def test_a_data_connection_opened_after_prefill_gave_up_on_it_fails_no_room(
    prefill: KVTransport,
) -> None:
    decode = make_transport("zmq", torch.zeros(POOL_PAGES, 256), None)
    try:
        peer, _ = handshake_held(prefill, decode)
        time.sleep(prefill.options.heartbeat_timeout_s)  # decode computes past prefill's hold
        prefill.poll(0)  # the hold and the offer expire: the answer leaves over ZeroMQ
        # Decode takes the offer late: prefill closes the connection, its token being void.
        events = poll_both(
            decode, prefill, lambda ev: decode.stats.get("data_channels_refused") or lost(ev)
        )
        assert not lost(events)
        assert prefill.stats["dropped_data_bad_token"] == 1
        assert not lost(transfer_two_pages(prefill, decode, peer))
        assert decode.stats["kv_bytes_in"] == 2 * PAGE_NBYTES
        assert decode.stats.get("data_kv_bytes_in", 0) == 0
    finally:
        decode.close()


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_decode_dying_mid_payload_fails_the_send_and_loses_the_peer(how: str) -> None:
    """A killed decode resets the connection; a frozen one keeps it open, and only ZeroMQ's
    heartbeats (asked through a probe while the send is stalled) can tell."""
    big = make_transport(
        "zmq",
        torch.zeros(BIG_POOL_PAGES, 256),
        "127.0.0.1",
        options=TransportOptions(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0),
    )
    pages = [str(BIG_POOL_PAGES), "--pool-pages", str(BIG_POOL_PAGES)]
    try:
        with start_peer("--connect", big.endpoint, "--ask-pages", *pages) as (proc, _):
            (handshake,) = [e for e in poll_until(big, lambda ev: ev) if isinstance(e, Inbound)]
            big.send(handshake.peer, m.HandshakeResult(ok=True))
            poll_until(big, lambda ev: inbound(ev, m.PageList))
            all_pages = list(range(BIG_POOL_PAGES))
            handle = big.send_kv(
                handshake.peer, 1, all_pages, all_pages, m.RoomStatus(room=1, ok=True)
            )
            assert not handle.done()  # the peer reads nothing: most of it waits here
            os.kill(proc.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            events = poll_until(big, lost)
    finally:
        big.close()
    (peer_lost,) = lost(events)
    assert peer_lost.peer == handshake.peer
    assert handle.done() and handle.error == peer_lost.reason
    if how == "frozen":
        assert "not connected" in peer_lost.reason


# -- a decode-side transport here, a hand-made or dying prefill ------------------------------
class RawPrefill:
    """A prefill made of raw sockets: it offers a data connection and writes what tests say."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:*")
        self.endpoint = self.router.last_endpoint.decode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.data: socket.socket | None = None

    def open(self, decode: KVTransport) -> str:
        """Take decode's handshake, offer the data connection, accept it and answer."""
        peer = decode.connect(self.endpoint)
        decode.send(peer, m.Handshake(decode_id="d", layout=LAYOUT))
        assert self.router.poll(5000)
        route, _ = self.router.recv_multipart()
        token = os.urandom(dc.TOKEN_NBYTES)
        offer = dc.DataOffer(port=self.listener.getsockname()[1], token=token)
        self.router.send_multipart([route, dc.encode(offer)])
        poll_until(decode, lambda _: decode.stats.get("data_channels_opened") == 1)
        self.listener.settimeout(5)
        self.data, _ = self.listener.accept()  # decode connected and wrote its token
        self.data.settimeout(5)
        assert self.data.recv(dc.TOKEN_NBYTES, socket.MSG_WAITALL) == token
        self.router.send_multipart([route, m.encode(m.HandshakeResult(ok=True))])
        poll_until(decode, lambda ev: inbound(ev, m.HandshakeResult))
        return peer

    def kv(self, room: int, dst: list[int], payload: bytes, counts: list[int] | None = None):
        header = m.KVHeader(
            room=room,
            frame_page_counts=[len(dst)] if counts is None else counts,
            page_nbytes=PAGE_NBYTES,
            dst_page_ids=dst,
        )
        self.data.sendall(framed(m.encode(header)) + payload)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.listener.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def raw_prefill() -> Iterator[RawPrefill]:
    prefill = RawPrefill()
    yield prefill
    prefill.close()


def floats(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


@pytest.fixture
def decode() -> Iterator[KVTransport]:
    # Runs of 2 pages are read straight into the pool: a grant's end is seen mid-record.
    options = TransportOptions(zero_copy_min_nbytes=2 * PAGE_NBYTES)
    transport = make_transport("zmq", make_pool(POOL_PAGES, seed=5), None, options=options)
    yield transport
    transport.close()


def test_hostile_records_write_only_granted_pages_while_granted(
    raw_prefill: RawPrefill, decode: KVTransport
) -> None:
    before = decode.pool.clone()
    pages = make_pool(4, seed=6).numpy().tobytes()
    peer = raw_prefill.open(decode)
    decode.send(peer, m.PageList(room=1, dst_page_ids=[2, 3, 4], prompt_len=3))
    decode.send(peer, m.PageList(room=2, dst_page_ids=[7, 8], prompt_len=2))
    raw_prefill.kv(99, [2], pages[:PAGE_NBYTES])  # no such room
    raw_prefill.kv(1, [5], pages[:PAGE_NBYTES])  # page not granted
    raw_prefill.kv(1, [2, 3], pages[: 2 * PAGE_NBYTES], counts=[1, 1])  # bad counts
    raw_prefill.kv(1, [4, 2], pages[: 2 * PAGE_NBYTES])
    raw_prefill.data.sendall(framed(m.encode(m.RoomStatus(room=1, ok=True))))
    events = poll_until(decode, lambda ev: inbound(ev, m.RoomStatus))
    assert [e for e in events if isinstance(e, KVReceived)] == [
        KVReceived(peer, 1, 2, 2 * PAGE_NBYTES, 3)
    ]
    assert decode.stats["dropped_kv_no_grant"] == 1
    assert decode.stats["dropped_kv_pages_not_granted"] == 1
    assert decode.stats["dropped_kv_frames"] == 1

    # Room 2's grant ends after its first page came: the second is read and dropped.
    raw_prefill.kv(2, [7, 8], pages[2 * PAGE_NBYTES : 3 * PAGE_NBYTES])  # half a record
    first = floats(pages[2 * PAGE_NBYTES : 3 * PAGE_NBYTES])
    poll_until(decode, lambda _: torch.equal(decode.pool[7].flatten(), first))
    decode.forget_room(2)
    raw_prefill.data.sendall(pages[3 * PAGE_NBYTES :])
    raw_prefill.data.sendall(framed(m.encode(m.RoomStatus(room=2, ok=True))))
    events = poll_until(decode, lambda ev: inbound(ev, m.RoomStatus))
    assert not [e for e in events if isinstance(e, KVReceived)]

    raw_prefill.data.sendall(dc.PREFIX.pack(1 << 31))  # a length nobody sends
    (peer_lost,) = lost(poll_until(decode, lost))
    assert "bad record length" in peer_lost.reason
    written = [2, 4, 7]
    untouched = [i for i in range(POOL_PAGES) if i not in written]
    assert torch.equal(decode.pool[untouched], before[untouched])
    assert torch.equal(decode.pool[[4, 2]].flatten(), floats(pages[: 2 * PAGE_NBYTES]))


def test_data_connection_closed_mid_record_loses_the_peer(
    raw_prefill: RawPrefill, decode: KVTransport
) -> None:
    peer = raw_prefill.open(decode)
    decode.send(peer, m.PageList(room=1, dst_page_ids=[2, 3], prompt_len=2))
    raw_prefill.kv(1, [2, 3], bytes(PAGE_NBYTES))  # one of two pages
    raw_prefill.data.close()
    events = poll_until(decode, lost)
    assert lost(events) == [
        PeerLost(
            peer,
            f"KV data connection from {peer}: data connection closed by prefill "
            "in the middle of a record",
        )
    ]
    assert not [e for e in events if isinstance(e, KVReceived)]


def test_prefill_dying_mid_payload_loses_the_peer_and_completes_nothing() -> None:
    pool_pages = ["--pool-pages", str(BIG_POOL_PAGES)]
    decode = make_transport("zmq", torch.zeros(BIG_POOL_PAGES, 256), None)
    try:
        with start_peer("--listen", "--exit-after-send", *pool_pages) as (proc, endpoint):
            peer = decode.connect(endpoint)
            decode.send(peer, m.Handshake(decode_id="d", layout=LAYOUT))
            poll_until(decode, lambda ev: inbound(ev, m.HandshakeResult))
            pages = list(range(BIG_POOL_PAGES))  # room 0 mod 3: one run, in one record
            decode.send(peer, m.PageList(room=3, dst_page_ids=pages, prompt_len=len(pages)))
            proc.wait(timeout=30)  # it exited mid-send while this side read nothing
            events = poll_until(decode, lost)
    finally:
        decode.close()
    # The data connection's end or ZeroMQ's, whichever is seen first.
    assert [e.peer for e in lost(events)][:1] == [peer]
    assert not [e for e in events if isinstance(e, KVReceived)]
    assert not inbound(events, m.RoomStatus)
