"""The raw TCP data connection of the ZeroMQ KV transport: page bytes with no copy in between.

Runs in worker processes, beside the ZeroMQ control channel. Prefill writes records from
its pool pages with sendmsg; decode reads them with recv_into straight into the granted pool
pages. A record is a 4-byte length, a msgpack message (a KVHeader, then its page bytes, or
the final RoomStatus), in the order sent. Sockets are non-blocking: the worker loop drives.
"""

from __future__ import annotations

import bisect
import itertools
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from pdserve.disagg.transfer.zmq.outbox import KVSend
from pdserve.disagg.transfer.zmq.pages import FramePlan

PREFIX = struct.Struct("<I")  # the length of the message that opens a record
TOKEN_NBYTES = 16  # decode's first bytes on a new connection: the token of its DataOffer
MAX_RECORD_NBYTES = 64 << 20  # page bytes per record, whatever the sender's options
IOV_WINDOW = 512  # buffers per sendmsg / recvmsg_into call (Linux allows 1024)
_SINK_NBYTES = 1 << 20  # bytes of a refused record are read into this and dropped
# Mid-payload, the receiver is woken only once this much (or the rest) has come: a wake-up
# costs tens of microseconds of Python, and loopback delivers 64 KiB at a time.
WAKE_NBYTES = 1 << 20
# Page bytes still read after a room's RoomStatus, before it is handed over: the rooms
# right behind it come in the same poll, and a large one delays it by little.
READ_ON_NBYTES = 1 << 20


class DataOffer(msgspec.Struct, tag="data_offer", kw_only=True):
    """prefill -> decode transport, when decode's Handshake comes: connect to `port` on the
    KV endpoint's host and send `token` first; page bytes then come on that connection."""

    port: int
    token: bytes


class DataProbe(msgspec.Struct, tag="data_probe"):
    """prefill -> decode transport, over ZeroMQ while a data send is stalled: its only use is
    to fail (EHOSTUNREACH) once ZeroMQ's heartbeats have given up on the peer."""


DataMsg = DataOffer | DataProbe
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DataMsg)


def encode(msg: DataMsg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> DataMsg:
    """Raises msgspec.MsgspecError on anything else."""
    return _decoder.decode(data)


class ChannelClosed(Exception):
    """The connection ended or broke the framing: the channel is unusable."""


class ChannelRefused(ChannelClosed):
    """Prefill closed the connection before any record: it did not take the token (it gave
    up waiting for it, or never offered it). Nothing was in flight on it; KV goes over ZeroMQ."""


class Cursor:
    """A position in a list of buffers that one byte stream drains or fills, in order."""

    def __init__(self, buffers: list[Any]) -> None:
        """`buffers`: flat byte memoryviews, bytes, or C-contiguous arrays."""
        self.buffers = [
            b if isinstance(b, memoryview) else memoryview(b).cast("B") for b in buffers
        ]
        self.ends = list(itertools.accumulate(len(b) for b in self.buffers))
        self.nbytes = self.ends[-1] if self.ends else 0
        self.done_nbytes = 0

    def window(self) -> list[memoryview]:
        """The rest of the buffers from the current position, at most IOV_WINDOW of them."""
        i = bisect.bisect_right(self.ends, self.done_nbytes)
        skip = self.done_nbytes - (self.ends[i] - len(self.buffers[i]))
        return [self.buffers[i][skip:], *self.buffers[i + 1 : i + IOV_WINDOW]]

    @property
    def finished(self) -> bool:
        return self.done_nbytes >= self.nbytes


@dataclass
class OutRecord:
    """One queued record: the pages of `plan` (then `message` is None) or a message alone.
    Its bytes are laid out (`cursor`) only when it reaches the head of the queue."""

    plan: FramePlan | None = None
    message: bytes | None = None
    handle: KVSend | None = None
    cursor: Cursor | None = None


class SendChannel:
    """Prefill side of one data connection: records leave in order, as the socket takes them."""

    def __init__(self, sock: Any, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.staging: Any = None  # a frame-sized buffer for gathering short page runs
        self.queue: deque[OutRecord] = deque()
        self.stalled_since: float | None = None  # since when no byte could be written

    def flush(self, lay_out: Callable[[OutRecord], Cursor], now: float) -> list[OutRecord]:
        """Write queued records until the socket pushes back; returns those fully written."""
        written: list[OutRecord] = []
        moved = False
        while self.queue:
            records = self._next_records(lay_out)
            buffers = [b for record in records for b in record.cursor.window()]
            try:
                sent = self.sock.sendmsg(buffers[:IOV_WINDOW])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ChannelClosed(f"data connection failed: {exc}") from exc
            moved = moved or sent > 0
            for record in records:
                taken = min(sent, record.cursor.nbytes - record.cursor.done_nbytes)
                record.cursor.done_nbytes += taken
                sent -= taken
                if not record.cursor.finished:
                    break
                written.append(self.queue.popleft())
        if moved or not self.queue:
            self.stalled_since = None
        if self.queue and self.stalled_since is None:
            self.stalled_since = now
        return written

    def _next_records(self, lay_out: Callable[[OutRecord], Cursor]) -> list[OutRecord]:
        """The head record, and the message records right behind it: they go in the same
        call, so a RoomStatus arrives with the last pages instead of a wake-up later."""
        records: list[OutRecord] = []
        for record in self.queue:
            if records and record.plan is not None:
                break
            if record.cursor is None:
                record.cursor = lay_out(record)
            records.append(record)
        return records

    def check_alive(self) -> None:
        """Called when the socket is readable: decode never writes, so that is its end."""
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ChannelClosed(f"data connection failed: {exc}") from exc
        raise ChannelClosed(
            "data connection closed by decode" if not data else "decode wrote on it"
        )


@dataclass
class Payload:
    """Where the page bytes of the record being read go; `cursor` None: read and drop them.
    `wanted()` is asked before every read: once it says False the rest is dropped."""

    nbytes: int
    cursor: Cursor | None = None
    wanted: Callable[[], bool] = lambda: True
    finish: Callable[[], None] = lambda: None


# What the transport does with a record's message: a Payload for the page bytes that follow a
# KVHeader, or None for a RoomStatus (handled then and there).
OnRecord = Callable[[memoryview], Payload | None]


class RecvChannel:
    """Decode side of one data connection: sends its token once connected, then reads records."""

    def __init__(self, sock: Any, peer: str, token: bytes, max_message_nbytes: int) -> None:
        self.sock, self.peer = sock, peer
        self.scratch: Any = None  # a buffer for records whose pages are scattered short runs
        self.unsent_token = memoryview(token)  # written first; read from once it is empty
        self.max_message_nbytes = max_message_nbytes
        self.num_records = 0  # records whose message was read in full
        self._head = bytearray(PREFIX.size)  # the prefix, then the message, being read
        self._head_nbytes = 0
        self._reading_message = False
        self._payload: Payload | None = None
        self._payload_left = 0
        self._wake_nbytes = 1  # the socket's SO_RCVLOWAT
        self._sink: memoryview | None = None

    def write_token(self) -> None:
        try:
            sent = self.sock.send(self.unsent_token)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ChannelClosed(f"data connection failed: {exc}") from exc
        self.unsent_token = self.unsent_token[sent:]

    def read(self, budget_nbytes: int, on_record: OnRecord) -> int:
        """Read until the socket is drained or `budget_nbytes` page bytes came in (at most
        READ_ON_NBYTES more once a room completed); returns the page bytes read. Raises
        ChannelClosed."""
        nbytes = 0
        while nbytes < budget_nbytes:
            if self._payload is None:
                message = self._read_head()
                if message is None:
                    break
                payload = on_record(message)
                if payload is None:  # a RoomStatus: its room is complete
                    budget_nbytes = min(budget_nbytes, nbytes + READ_ON_NBYTES)
                    continue
                if payload.nbytes > 0:
                    self._payload, self._payload_left = payload, payload.nbytes
                continue
            got = self._read_payload(self._payload)
            if got == 0:
                break
            nbytes += got
        self._wake_when(min(self._payload_left, WAKE_NBYTES) if self._payload else 1)
        return nbytes

    def _wake_when(self, nbytes: int) -> None:
        """Make the socket readable (for the selector) only once `nbytes` are queued."""
        if nbytes != self._wake_nbytes:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            self._wake_nbytes = nbytes

    def _read_head(self) -> memoryview | None:
        """The next record's message once all of it is in, else None."""
        while True:
            view = memoryview(self._head)[self._head_nbytes :]
            mid_record = self._reading_message or self._head_nbytes > 0
            self._head_nbytes += self._recv_into(view, mid_record)
            if self._head_nbytes < len(self._head):
                return None
            if self._reading_message:
                message = memoryview(self._head)
                self._head, self._head_nbytes = bytearray(PREFIX.size), 0
                self._reading_message = False
                self.num_records += 1
                return message
            (length,) = PREFIX.unpack(self._head)
            if not 0 < length <= self.max_message_nbytes:
                raise ChannelClosed(f"bad record length {length}")
            self._head, self._head_nbytes = bytearray(length), 0
            self._reading_message = True

    def _read_payload(self, payload: Payload) -> int:
        """Read some of the payload: into its cursor while wanted, else into the sink."""
        if payload.cursor is not None and not payload.wanted():
            payload.cursor = None  # the grant ended: nothing more may be written
        if payload.cursor is None:
            got = self._recv_into(self._sink_view()[: self._payload_left], mid_record=True)
        else:
            window = payload.cursor.window()
            if len(window) == 1:
                got = self._recv_into(window[0], mid_record=True)
            else:
                got = self._recvmsg_into(window)
            payload.cursor.done_nbytes += got
        self._payload_left -= got
        if self._payload_left == 0:
            self._payload = None
            if payload.cursor is not None:
                payload.finish()
        return got

    def _sink_view(self) -> memoryview:
        if self._sink is None:
            self._sink = memoryview(bytearray(_SINK_NBYTES))
        return self._sink

    def _recv_into(self, view: memoryview, mid_record: bool) -> int:
        """Bytes read into `view`; 0 if none are there yet."""
        try:
            got = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if not mid_record and self.num_records == 0:
                raise ChannelRefused(f"data connection reset before any record: {exc}") from exc
            raise ChannelClosed(f"data connection failed: {exc}") from exc
        if got == 0:
            if not mid_record and self.num_records == 0:
                raise ChannelRefused("data connection closed by prefill before any record")
            where = "in the middle of a record" if mid_record else "between records"
            raise ChannelClosed(f"data connection closed by prefill {where}")
        return got

    def _recvmsg_into(self, window: list[memoryview]) -> int:
        try:
            got = self.sock.recvmsg_into(window)[0]
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise ChannelClosed(f"data connection failed: {exc}") from exc
        if got == 0:
            raise ChannelClosed("data connection closed by prefill in the middle of a record")
        return got
