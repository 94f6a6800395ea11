"""The NIXL KV transport (UCX) between a prefill-side and a decode-side transport in this
process: pages land bit-exact and only in granted pages, refused and aborted rooms move
nothing and free prefill's pages, a lost peer fails its sends. Skipped without NIXL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
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
from pdserve.disagg.transfer.base import PagesSettled, PeerLost
from pdserve.disagg.transfer.nixl_agent import nixl_missing, read_runs
from tests.disagg.transfer_peer import LAYOUT, make_pool, poll_until, start_peer

pytestmark = pytest.mark.skipif(nixl_missing() is not None, reason=str(nixl_missing()))

NUM_PAGES = 32
PAGE_FLOATS = 256  # 1 KiB pages
SENTINEL = -1.0


class Pair:
    """A listening (prefill) and a connecting (decode) NIXL transport, handshaken."""

    def __init__(self) -> None:
        self.src_pool = torch.arange(NUM_PAGES * PAGE_FLOATS, dtype=torch.float32).view(
            NUM_PAGES, PAGE_FLOATS
        )
        self.dst_pool = torch.full((NUM_PAGES, PAGE_FLOATS), SENTINEL)
        self.prefill = make_transport("nixl", self.src_pool, "127.0.0.1")
        self.decode = make_transport("nixl", self.dst_pool, None)
        self.peer = self.decode.connect(self.prefill.endpoint)
        # What the workers do with Handshake / HandshakeResult.transfer_meta.
        self.decode.send(self.peer, m.Ping(seq=0))
        first = pump(self, lambda ev: any(side == "prefill" for side, _ in ev))
        self.prefill_peer = next(e.peer for side, e in first if side == "prefill")
        assert (
            self.prefill.accept_peer_meta(self.prefill_peer, self.decode.handshake_meta()) is None
        )
        assert self.decode.accept_peer_meta(self.peer, self.prefill.handshake_meta()) is None

    def grant(self, room: int, dst: list[int]) -> None:
        self.decode.send(self.peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=len(dst)))
        pump(self, lambda ev: room in inbound_rooms(ev, "prefill", m.PageList))

    def send(self, room: int, src: list[int], dst: list[int]):
        return self.prefill.send_kv(
            self.prefill_peer, room, src, dst, m.RoomStatus(room=room, ok=True)
        )

    def close(self) -> None:
        self.decode.close()
        self.prefill.close()


def pump(pair: Pair, done, timeout_s: float = 20.0) -> list[tuple[str, Event]]:
    """Poll both sides until `done(events so far)`; AssertionError at the deadline."""
    events: list[tuple[str, Event]] = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        for side, transport in (("prefill", pair.prefill), ("decode", pair.decode)):
            events += [(side, e) for e in transport.poll(1)]
    return events


def inbound_rooms(events, side: str, kind: type) -> set[int]:
    return {
        e.msg.room
        for s, e in events
        if s == side and isinstance(e, Inbound) and isinstance(e.msg, kind)
    }


def kv_received(events) -> list[KVReceived]:
    return [e for s, e in events if s == "decode" and isinstance(e, KVReceived)]


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def test_read_runs_pair_runs_where_both_sides_count_up() -> None:
    src, dst = torch.tensor([0, 1, 2, 7, 8, 3]).numpy(), torch.tensor([5, 6, 9, 10, 11, 4]).numpy()
    assert read_runs(src, dst) == [(0, 5, 2), (2, 9, 1), (7, 10, 2), (3, 4, 1)]


def test_pages_land_bit_exact_in_granted_pages_and_nowhere_else(pair: Pair) -> None:
    rooms = {3: ([0, 1, 2, 20, 21], [3, 4, 9, 10, 11]), 4: ([30, 5, 6], [0, 31, 30])}
    for room, (_, dst) in rooms.items():
        pair.grant(room, dst)
    handles = {room: pair.send(room, src, dst) for room, (src, dst) in rooms.items()}
    events = pump(
        pair,
        lambda ev: (
            inbound_rooms(ev, "decode", m.RoomStatus) == set(rooms)
            and all(h.done() for h in handles.values())
        ),
    )
    assert all(h.error is None for h in handles.values())
    touched = torch.zeros(NUM_PAGES, dtype=torch.bool)
    for room, (src, dst) in rooms.items():
        assert torch.equal(pair.dst_pool[dst], pair.src_pool[src]), f"room {room}: wrong bytes"
        touched[dst] = True
        assert KVReceived(pair.peer, room, len(dst), len(dst) * 1024, len(dst)) in kv_received(
            events
        )
    assert bool((pair.dst_pool[~touched] == SENTINEL).all()), "a page outside the grants changed"
    assert pair.decode.stats["kv_bytes_in"] == pair.prefill.stats["kv_bytes_out"] == 8 * 1024


@pytest.mark.parametrize("how", ["pages not granted", "aborted", "never granted"])
def test_a_room_outside_its_grant_moves_nothing_and_frees_prefills_pages(
    pair: Pair, how: str
) -> None:
    room = 7
    if how != "never granted":
        pair.grant(room, [1, 2])
    if how == "aborted":
        pair.decode.send(pair.peer, m.Abort(room=room, reason="decode deadline"))
    dst = [1, 2, 3] if how == "pages not granted" else [1, 2]
    handle = pair.send(room, [4, 5, 6][: len(dst)], dst)
    events = pump(
        pair, lambda ev: handle.done() and room in inbound_rooms(ev, "decode", m.RoomStatus)
    )
    assert handle.error is not None and "refused" in handle.error
    assert bool((pair.dst_pool == SENTINEL).all())
    # The room fails on decode with prefill's part named (a 502 from the prefill side), not
    # as decode's 500 for an incomplete KV (its router blamed decode for prefill's fault).
    assert kv_received(events) == []
    [status] = [
        e.msg
        for s, e in events
        if s == "decode" and isinstance(e, Inbound) and isinstance(e.msg, m.RoomStatus)
    ]
    assert not status.ok and status.error_status == 502, status
    assert "its copy was refused" in status.error
    assert sum(v for k, v in pair.decode.stats.items() if k.startswith("dropped_nixl_")) == 1


def test_a_room_forgotten_on_prefill_before_decode_was_told_of_it_is_never_read(
    pair: Pair,
) -> None:
    pair.grant(8, [10, 11])
    handle = pair.send(8, [1, 2], [10, 11])
    assert pair.prefill.forget_room(8) == []  # its copy had not left: no read can come
    assert handle.done() and handle.error == "room forgotten before it was sent"
    pair.grant(9, [12])  # a room behind it goes through; room 8's status never comes
    pair.send(9, [3], [12])
    events = pump(pair, lambda ev: 9 in inbound_rooms(ev, "decode", m.RoomStatus))
    assert 8 not in inbound_rooms(events, "decode", m.RoomStatus)
    assert bool((pair.dst_pool[[10, 11]] == SENTINEL).all())


def test_a_room_forgotten_on_prefill_after_decode_was_told_keeps_its_pages_until_read(
    pair: Pair,
) -> None:
    pair.grant(8, [10, 11])
    handle = pair.send(8, [1, 2], [10, 11])
    events = [("prefill", e) for e in pair.prefill.poll(0)]  # the batch goes out
    assert pair.prefill.forget_room(8) == [1, 2]  # decode may read them any time now
    assert not handle.done()
    events += pump(pair, lambda ev: any(isinstance(e, PagesSettled) for _, e in ev))
    assert [e.page_ids for s, e in events if isinstance(e, PagesSettled)] == [[1, 2]]
    assert handle.done()
    assert torch.equal(pair.dst_pool[[10, 11]], pair.src_pool[[1, 2]])
    untouched = [i for i in range(NUM_PAGES) if i not in (10, 11)]
    assert bool((pair.dst_pool[untouched] == SENTINEL).all())


def test_a_lost_decode_fails_the_sends_waiting_for_its_read(pair: Pair) -> None:
    pair.grant(9, [1])
    handle = pair.send(9, [2], [1])
    pair.prefill.poll(0)  # the batch goes out while decode is connected
    assert not handle.done()
    pair.decode.close()  # the read never comes; prefill's probe finds the route gone
    deadline = time.monotonic() + 20  # well before the 30 s read deadline
    while not handle.done():
        assert time.monotonic() < deadline, "the send never failed"
        pair.prefill.poll(20)
    assert "not connected" in (handle.error or "")


def test_metadata_that_is_not_nixl_is_refused_with_a_reason(pair: Pair) -> None:
    transport: KVTransport = pair.decode
    assert "NIXL metadata" in (transport.accept_peer_meta(pair.peer, b"garbage") or "")


def test_a_send_a_frozen_decode_never_reads_fails_at_the_read_deadline() -> None:
    pool = torch.zeros(4, 16)
    prefill = make_transport(
        "nixl", pool, "127.0.0.1", options=TransportOptions(read_timeout_s=0.2)
    )
    decode = make_transport("nixl", torch.zeros(4, 16), None)
    try:
        peer = decode.connect(prefill.endpoint)
        decode.send(peer, m.Ping(seq=1))
        deadline = time.monotonic() + 20
        inbound: list[Event] = []
        while not inbound:
            assert time.monotonic() < deadline
            inbound = [e for e in prefill.poll(20) if isinstance(e, Inbound)]
        # decode stops polling (frozen): the connection stays up, nobody reads
        handle = prefill.send_kv(inbound[0].peer, 1, [0], [0], m.RoomStatus(room=1, ok=True))
        while not handle.done():
            assert time.monotonic() < deadline, "the send never ended"
            prefill.poll(20)
        assert handle.error == "decode did not read the KV within 0.2s"
    finally:
        decode.close()
        prefill.close()


def test_a_read_still_running_when_its_room_is_forgotten_keeps_its_pages_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over UCX's TCP emulation a read needs the peer's progress: with prefill not polled it
    cannot end, so forgetting its room returns the pages, which are settled only after."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    pair = Pair()
    try:
        dst = [3, 4, 5, 6]
        pair.grant(5, dst)
        pair.send(5, [0, 1, 2, 7], dst)
        events: list[Event] = pair.prefill.poll(0)  # the batch goes out
        deadline = time.monotonic() + 10
        while not pair.decode.busy():  # the read is posted when the batch arrives
            assert time.monotonic() < deadline, "decode never started the read"
            events += pair.decode.poll(1)
        assert pair.decode.forget_room(5) == dst
        for _ in range(20):
            events += pair.decode.poll(1)
        assert not any(isinstance(e, PagesSettled) for e in events)
        settled = pump(pair, lambda ev: any(isinstance(e, PagesSettled) for _, e in ev))
        assert [e.page_ids for _, e in settled if isinstance(e, PagesSettled)] == [dst]
        assert pair.decode.forget_room(5) == []
        untouched = [i for i in range(NUM_PAGES) if i not in dst]
        assert bool((pair.dst_pool[untouched] == SENTINEL).all())
    finally:
        pair.close()


def test_a_prefill_killed_while_decode_reads_from_it_fails_the_read_not_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over UCX's TCP emulation a read needs the peer's progress: prefill frozen, the read
    runs until prefill is killed. NIXL then raises NIXL_ERR_REMOTE_DISCONNECT for the read's
    state, which crashed the decode worker's loop (kill -9 of a prefill server under load)."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # the peer process inherits it
    decode = make_transport("nixl", make_pool(64, seed=2), None)
    args = ("--backend", "nixl", "--listen", "--freeze-after-send")
    try:
        with start_peer(*args) as (proc, endpoint):
            peer = decode.connect(endpoint)
            handshake = m.Handshake(decode_id="d", layout=LAYOUT, backend="nixl")
            decode.send(
                peer, msgspec.structs.replace(handshake, transfer_meta=decode.handshake_meta())
            )
            answer = poll_until(decode, lambda ev: any(isinstance(e, Inbound) for e in ev))
            assert decode.accept_peer_meta(peer, answer[-1].msg.transfer_meta) is None
            dst = [3, 4, 5, 6]
            decode.send(peer, m.PageList(room=5, dst_page_ids=dst, prompt_len=len(dst)))
            deadline = time.monotonic() + 20
            while not decode.busy():  # the read is posted when the batch arrives
                assert time.monotonic() < deadline, "decode never started the read"
                decode.poll(1)
            proc.kill()
            proc.wait()
            events = poll_until(decode, lambda ev: any(isinstance(e, PeerLost) for e in ev))
        assert decode.forget_room(5) == []  # the read ended with its peer: no page waits
        assert not any(isinstance(e, KVReceived) for e in events)
    finally:
        decode.close()


def test_a_repeated_handshake_with_the_same_agent_leaves_a_read_in_flight_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode handshakes again with a prefill worker that forgot its handshake while the
    connection stayed up (RoomStatus.handshake_needed); the metadata is the same agent's,
    and reloading it removed the agent under a read of another room still running."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # the read waits for prefill's progress (above)
    pair = Pair()
    try:
        dst = [3, 4, 5, 6]
        pair.grant(5, dst)
        handle = pair.send(5, [0, 1, 2, 7], dst)
        pair.prefill.poll(0)  # the batch goes out
        deadline = time.monotonic() + 10
        while not pair.decode.busy():
            assert time.monotonic() < deadline, "decode never started the read"
            pair.decode.poll(1)
        assert pair.decode.accept_peer_meta(pair.peer, pair.prefill.handshake_meta()) is None
        events = pump(pair, lambda ev: 5 in inbound_rooms(ev, "decode", m.RoomStatus))
        pump(pair, lambda ev: handle.done())
        assert handle.error is None
        assert KVReceived(pair.peer, 5, 4, 4 * 1024, 4) in kv_received(events)
        assert torch.equal(pair.dst_pool[dst], pair.src_pool[[0, 1, 2, 7]])
    finally:
        pair.close()
