"""A prefill-side room forgotten while its KV is still being sent (decode slow to read): what
has not started is dropped, its RoomStatus included; the pages a send under way still reads
are returned and settled later, so bytes decode takes are never another request's KV. Two
transports in this process over loopback sockets, on both the data connection and ZeroMQ."""

from __future__ import annotations

import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import (
    Inbound,
    KVTransport,
)
from pdserve.disagg.transfer.base import PagesSettled
from tests.disagg.transfer_peer import LAYOUT, SmallBuffers, backed_up_options, poll_until

NUM_PAGES = 16 << 10  # 16 MiB of 1 KiB pages: more than a data connection's buffers hold
GARBAGE = -7.0  # what "another request's prefill" writes into reused pages


def statuses(events: list, room: int) -> list[m.RoomStatus]:
    return [
        e.msg
        for e in events
        if isinstance(e, Inbound) and isinstance(e.msg, m.RoomStatus) and e.msg.room == room
    ]


def settled(events: list) -> list[int]:
    return [p for e in events if isinstance(e, PagesSettled) for p in e.page_ids]


def connect(prefill: KVTransport, decode: KVTransport) -> tuple[str, str]:
    """Decode handshakes (opening the data connection where offered) and grants room 1 every
    page in reverse order. Returns (decode's id of prefill, prefill's id of decode)."""
    peer = decode.connect(prefill.endpoint)
    decode.send(peer, m.Handshake(decode_id="d", layout=LAYOUT))
    (handshake,) = [e for e in poll_until(prefill, lambda ev: ev) if isinstance(e, Inbound)]
    prefill.send(handshake.peer, m.HandshakeResult(ok=True))
    poll_until(
        decode, lambda ev: [e for e in ev if isinstance(e, Inbound)] or prefill.poll(0) and 0
    )
    dst = list(reversed(range(NUM_PAGES)))  # scattered: records are frame-sized
    decode.send(peer, m.PageList(room=1, dst_page_ids=dst, prompt_len=NUM_PAGES))
    poll_until(prefill, lambda ev: ev)
    return peer, handshake.peer


def back_up(prefill: KVTransport) -> None:
    """Poll until a poll moves nothing on: decode does not read, so the kernel's buffers and
    ZeroMQ's queues are full and the send waits in the middle of a message."""
    num_sent = [-1]

    def stuck(_: list) -> bool:
        now = prefill.stats.get("msgs_out", 0) + prefill.stats.get("data_kv_bytes_out", 0)
        moved, num_sent[0] = now != num_sent[0], now
        return not moved

    poll_until(prefill, stuck)


@pytest.mark.parametrize("data_channel", [True, False], ids=["data_connection", "zeromq"])
def test_a_room_forgotten_mid_send_holds_only_pages_still_read_and_decode_never_takes_others(
    data_channel: bool,
) -> None:
    options = backed_up_options(data_channel)
    source = torch.rand((NUM_PAGES, 256), generator=torch.Generator().manual_seed(5))
    prefill = SmallBuffers(source, listen_host="127.0.0.1", options=options)
    decode = SmallBuffers(torch.zeros(NUM_PAGES + 2, 256), options=options)
    try:
        peer, decode_peer = connect(prefill, decode)
        assert decode.stats.get("data_channels_opened", 0) == int(data_channel)
        original = prefill.pool.clone()
        src, dst = list(range(NUM_PAGES)), list(reversed(range(NUM_PAGES)))
        handle = prefill.send_kv(decode_peer, 1, src, dst, m.RoomStatus(room=1, ok=True))
        back_up(prefill)
        assert not handle.done()

        held = prefill.forget_room(1)
        # Zero-copy frames ZeroMQ holds, or the record half written: read from the pool still.
        assert held and len(held) < NUM_PAGES and set(held) <= set(src)
        reused = sorted(set(src) - set(held))
        prefill.pool[reused] = GARBAGE  # the engine gives the rest to another prefill at once

        # Room 2 behind it: once its status is in, all that was sent for room 1 is too.
        decode.send(peer, m.PageList(room=2, dst_page_ids=[NUM_PAGES, NUM_PAGES + 1], prompt_len=2))
        events: list = []
        room_2_started: list[bool] = []

        def room_2_sent(prefill_events: list) -> bool:
            # Called with every prefill event so far: room 2's page list starts one send.
            events.extend(decode.poll(0))
            for e in prefill_events:
                if isinstance(e, Inbound) and isinstance(e.msg, m.PageList) and not room_2_started:
                    room_2_started.append(True)
                    prefill.send_kv(
                        decode_peer, 2, [0, 1], e.msg.dst_page_ids, m.RoomStatus(room=2, ok=True)
                    )
                if isinstance(e, PagesSettled):
                    prefill.pool[e.page_ids] = GARBAGE  # settled: reused now
            return bool(statuses(events, 2))

        prefill_events = poll_until(prefill, room_2_sent)
        prefill_events += poll_until(
            prefill, lambda ev: sorted(settled(prefill_events + ev)) == sorted(held)
        )
    finally:
        decode.close()
        prefill.close()

    assert statuses(events, 1) == []  # its "ok" never left: it was still queued
    assert statuses(events, 2) == [m.RoomStatus(room=2, ok=True)]
    assert torch.equal(decode.pool[[NUM_PAGES, NUM_PAGES + 1]], prefill.pool[[0, 1]])
    got = decode.pool[dst]
    arrived = ~(got == 0).all(dim=1)
    assert bool(arrived[held].all())  # what was held arrived...
    assert torch.equal(got[arrived], original[src][arrived])  # ...and nothing but the room's KV
