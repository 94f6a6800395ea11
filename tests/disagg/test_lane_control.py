"""The cuda_ipc backend's control lane on CPUs (`fake_lane`: the fake backend with the lane;
real processes and sockets): handshake, grants and statuses travel on it, an abort still
refuses late KV, messages wait in order for a peer that does not read, a dead peer is
unreachable at once, and a lane busy at every poll does not keep ZeroMQ unread."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Inbound,
    KVReceived,
    PeerLost,
    PeerUnreachable,
    TransportOptions,
)
from pdserve.disagg.transfer.fake_backend import FakeLaneTransport
from tests.disagg.transfer_peer import LAYOUT, make_pool, poll_until, start_peer

POOL_PAGES = 16


@pytest.fixture
def decode() -> Iterator[FakeLaneTransport]:
    transport = FakeLaneTransport(make_pool(POOL_PAGES, seed=2))
    yield transport
    transport.close()


def handshake(decode: FakeLaneTransport, endpoint: str) -> str:
    peer = decode.connect(endpoint)
    decode.send(peer, m.Handshake(decode_id="lane-test", layout=LAYOUT, backend="fake"))
    poll_until(decode, lambda ev: any(isinstance(e.msg, m.HandshakeResult) for e in ev))
    return peer


def inbound(events, kind) -> list:
    return [e.msg for e in events if isinstance(e, Inbound) and isinstance(e.msg, kind)]


def test_control_messages_and_grants_travel_on_the_lane(decode):
    with start_peer("--backend", "fake_lane", "--listen", "--pool-pages", "16") as (_, endpoint):
        peer = handshake(decode, endpoint)
        decode.send(peer, m.PageList(room=3, dst_page_ids=[4, 9, 1], prompt_len=9))
        events = poll_until(decode, lambda ev: inbound(ev, m.RoomStatus))
    (received,) = [e for e in events if isinstance(e, KVReceived)]
    assert received.room == 3 and received.complete
    assert inbound(events, m.RoomStatus)[0].first.token_id == 7
    assert decode.stats["lane_datagrams_out"] == decode.stats["msgs_out"] == 2
    assert len(decode.sockets()) == 4  # ZeroMQ socket, its monitor, data links, the lane


def test_kv_for_an_aborted_room_is_refused_on_the_lane(decode):
    with start_peer("--backend", "fake_lane", "--listen", "--pool-pages", "16") as (_, endpoint):
        peer = handshake(decode, endpoint)
        decode.send(peer, m.PageList(room=5, dst_page_ids=[2, 3], prompt_len=8))
        decode.send(peer, m.Abort(room=5, reason="client went away"))  # revokes at once
        events = poll_until(decode, lambda ev: inbound(ev, m.RoomStatus))
    assert not any(isinstance(e, KVReceived) for e in events)
    assert decode.stats["dropped_kv_no_grant"] == 1


def test_messages_wait_in_order_for_a_peer_that_does_not_read(decode):
    prefill = FakeLaneTransport(make_pool(POOL_PAGES, seed=3), listen_host="127.0.0.1")
    try:
        peer = decode.connect(prefill.endpoint)
        for seq in range(300):
            decode.send(peer, m.Ping(seq=seq))
        assert decode.busy(), "the kernel took 300 datagrams unread: no backpressure"
        pings: list[int] = []
        while len(pings) < 300:
            events = poll_until(prefill, lambda ev: ev, timeout_s=20)
            pings += [msg.seq for msg in inbound(events, m.Ping)]
            decode.poll(0)
        assert pings == list(range(300))
        assert not decode.busy()
    finally:
        prefill.close()


def test_a_dead_peer_is_unreachable_at_once(decode):
    with start_peer("--backend", "fake_lane", "--listen", "--pool-pages", "16") as (proc, endpoint):
        peer = handshake(decode, endpoint)
        proc.kill()
        proc.wait(timeout=10)
    with pytest.raises(PeerUnreachable, match="no control lane"):
        decode.send(peer, m.PageList(room=1, dst_page_ids=[0], prompt_len=4))
    assert not decode.busy()


def test_a_peer_without_the_lane_is_unreachable_with_a_reason(decode):
    options = TransportOptions(ipc_lane=False)
    prefill = FakeLaneTransport(torch.zeros(4, 8), listen_host="127.0.0.1", options=options)
    try:
        peer = decode.connect(prefill.endpoint)
        with pytest.raises(PeerUnreachable, match="no control lane"):
            decode.send(peer, m.Ping(seq=1))
    finally:
        prefill.close()


def test_a_lane_busy_at_every_poll_still_lets_zeromq_report_a_lost_peer():
    """A lane spin that finds work returns it at once, skipping the ZeroMQ half of the poll,
    but never for longer than ZMQ_MAX_SKIP_S: with a Pong waiting on the lane at every poll,
    the ZeroMQ monitor still reports a peer whose connection closed."""
    spin = TransportOptions(lane_spin_us=2000)
    decode = FakeLaneTransport(make_pool(POOL_PAGES, seed=2), options=spin)
    busy = FakeLaneTransport(make_pool(POOL_PAGES, seed=3), listen_host="127.0.0.1")
    gone = FakeLaneTransport(make_pool(POOL_PAGES, seed=4), listen_host="127.0.0.1")
    try:
        busy_peer, gone_peer = decode.connect(busy.endpoint), decode.connect(gone.endpoint)
        decode.send(gone_peer, m.Ping(seq=0))
        poll_until(gone, lambda ev: inbound(ev, m.Ping))  # the connection is up

        def busy_poll(seq: int) -> list:
            decode.send(busy_peer, m.Ping(seq=seq))  # answered at once: the spin finds it
            for event in poll_until(busy, lambda ev: inbound(ev, m.Ping)):
                busy.send(event.peer, m.Pong(seq=seq))
            events = decode.poll(5)
            assert inbound(events, m.Pong), "the lane had work at this poll"
            return events

        for seq in range(1, 6):  # the ZeroMQ half is now read at most every ZMQ_MAX_SKIP_S
            busy_poll(seq)
        gone.close()
        deadline = time.monotonic() + 20
        for seq in itertools.count(6):
            assert time.monotonic() < deadline, "the closed peer was never reported"
            if any(isinstance(e, PeerLost) and e.peer == gone_peer for e in busy_poll(seq)):
                break
    finally:
        for transport in (decode, busy, gone):
            transport.close()
