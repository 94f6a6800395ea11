"""How much one read of the KV data connection hands over: every room whose records are in
(one poll of a decode worker completed one room per connection, so a decode busy computing
took in a room per step), but little past a completed room, so a large room behind it does
not hold it back. A real socket pair; the records as prefill frames them."""

from __future__ import annotations

import socket
import threading

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.zmq import data_channel as dc
from pdserve.disagg.transfer.zmq.data_records import framed

PAGE_NBYTES = 1024


def room_records(room: int, num_pages: int) -> bytes:
    header = m.KVHeader(room=room, frame_page_counts=[num_pages], page_nbytes=PAGE_NBYTES)
    status = m.RoomStatus(room=room, ok=True)
    return framed(m.encode(header)) + bytes(num_pages * PAGE_NBYTES) + framed(m.encode(status))


def reader(sock: socket.socket) -> tuple[dc.RecvChannel, list[int], dc.OnRecord]:
    sock.setblocking(False)
    channel = dc.RecvChannel(sock, "prefill", b"", 1 << 20)
    completed: list[int] = []

    def on_record(message: memoryview) -> dc.Payload | None:
        msg = m.decode(message)
        if isinstance(msg, m.RoomStatus):
            completed.append(msg.room)
            return None
        return dc.Payload(sum(msg.frame_page_counts) * msg.page_nbytes)  # read and dropped

    return channel, completed, on_record


def test_one_read_hands_over_every_room_already_in() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"".join(room_records(room, 4) for room in (1, 2, 3)))
        channel, completed, on_record = reader(ours)
        channel.read(64 << 20, on_record)
        assert completed == [1, 2, 3]


def test_a_large_room_behind_a_completed_one_waits_for_the_next_read() -> None:
    big_pages = 4 * dc.READ_ON_NBYTES // PAGE_NBYTES
    ours, theirs = socket.socketpair()
    with ours, theirs:
        data = room_records(1, 4) + room_records(2, big_pages)
        writer = threading.Thread(target=theirs.sendall, args=(data,), daemon=True)
        writer.start()
        channel, completed, on_record = reader(ours)
        read = 0
        while not completed:  # room 1's bytes are all written before room 2's
            read += channel.read(64 << 20, on_record)
        assert completed == [1]
        assert read <= 4 * PAGE_NBYTES + 2 * dc.READ_ON_NBYTES  # the cap, and one recv past it
        while completed == [1]:
            channel.read(64 << 20, on_record)
        writer.join(10)
        assert completed == [1, 2]
