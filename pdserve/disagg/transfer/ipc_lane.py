"""The control lane of the cuda_ipc KV transport: one Unix datagram socket per worker process
(abstract namespace, so one host), where sending to a peer is one system call and its loop
wakes on one readable descriptor, with no ZeroMQ I/O thread in between. Runs in prefill and
decode worker processes.

Between two lanes the messages form an ordered stream of length-prefixed messages cut into
datagrams of at most CHUNK_NBYTES (Unix datagrams are neither lost nor reordered); what the
receiving queue cannot take now waits here, in order, and leaves at the next `flush`.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
from collections import Counter

PREFIX = "pdserve-kv/"
CHUNK_NBYTES = 64 << 10
MAX_MESSAGE_NBYTES = 64 << 20  # a longer length prefix is garbage: the stream is reset
MAX_QUEUED_NBYTES = 256 << 20  # a peer this far behind is not reading: it is lost
SOCKET_BUFFER_NBYTES = 4 << 20  # asked for; the kernel caps it (net.core.[rw]mem_max)
_HEADER = struct.Struct("<Q")  # every datagram: the sending lane's incarnation
_LENGTH = struct.Struct("<I")  # every message: its length in bytes


class LaneGone(Exception):
    """No lane is bound at the peer's address: it exited, or it is on another host."""


def lane_address(owner_id: str) -> bytes:
    """The abstract socket address of the lane owned by `owner_id` (a transport's endpoint
    when it listens, its ZeroMQ routing id when it connects). Short ids are kept readable
    so that the receiver can name the sender; long ones are hashed (only for endpoints,
    which the connecting side already knows)."""
    name = owner_id if len(owner_id) <= 90 else "#" + hashlib.sha256(owner_id.encode()).hexdigest()
    return b"\0" + (PREFIX + name).encode()


def owner_of(address: bytes) -> str | None:
    """The owner id a readable lane address names, or None."""
    prefix = b"\0" + PREFIX.encode()
    if not address.startswith(prefix) or address.startswith(prefix + b"#"):
        return None
    return address[len(prefix) :].decode(errors="replace")


class Lane:
    """One bound datagram socket: queued streams out to peers, reassembled streams in."""

    def __init__(self, owner_id: str) -> None:
        self.address = lane_address(owner_id)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self._sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_NBYTES)
        try:
            self._sock.bind(self.address)
        except OSError as exc:
            self._sock.close()
            raise ValueError(f"cannot bind the KV control lane of {owner_id!r}: {exc}") from exc
        # Asked before each read: a read of an empty socket raises, which costs 3x the ask
        # (a decode loop spinning on the lane reads it every few microseconds).
        self._readable = select.poll()
        self._readable.register(self._sock, select.POLLIN)
        self._incarnation = _HEADER.pack(int.from_bytes(os.urandom(8), "little"))
        self._out: dict[bytes, bytearray] = {}  # peer address -> bytes its queue refused
        self._in: dict[bytes, tuple[bytes, bytearray]] = {}  # -> (incarnation, partial)
        self.stats: Counter[str] = Counter()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, address: bytes, payload: bytes) -> None:
        """Queue one message for `address` behind what waits for it, and push what its
        queue takes now. Raises LaneGone (and forgets the peer's queue) if nobody is there."""
        out = self._out.setdefault(address, bytearray())
        out += _LENGTH.pack(len(payload))
        out += payload
        self._push(address, out)

    def flush(self) -> list[tuple[bytes, str]]:
        """Push queued bytes to every peer; (address, reason) of the peers found gone."""
        gone = []
        for address, out in list(self._out.items()):
            try:
                self._push(address, out)
            except LaneGone as exc:
                gone.append((address, str(exc)))
        return gone

    def queued_nbytes(self, address: bytes | None = None) -> int:
        """Bytes waiting for `address` (for every peer if None)."""
        if address is not None:
            return len(self._out.get(address, b""))
        return sum(len(out) for out in self._out.values())

    def forget(self, address: bytes) -> None:
        """Drop what waits for the peer and its partial inbound message (it is lost)."""
        self._out.pop(address, None)
        self._in.pop(address, None)

    def _push(self, address: bytes, out: bytearray) -> None:
        while out:
            n = min(len(out), CHUNK_NBYTES)
            with memoryview(out) as view:
                try:
                    self._sock.sendmsg([self._incarnation, view[:n]], [], 0, address)
                except BlockingIOError:  # the peer's queue is full: it has not read yet
                    return
                except (ConnectionRefusedError, FileNotFoundError) as exc:
                    self._out.pop(address, None)
                    raise LaneGone(f"no KV control lane at {address[1:]!r}: {exc}") from exc
            del out[:n]
            self.stats["lane_datagrams_out"] += 1
        self._out.pop(address, None)

    def receive(self, max_datagrams: int = 4096) -> list[tuple[bytes, bytes]]:
        """(sender address, message) of every message completed by what arrived, in order."""
        messages: list[tuple[bytes, bytes]] = []
        for _ in range(max_datagrams):
            if not self._readable.poll(0):
                break
            try:
                data, address = self._sock.recvfrom(_HEADER.size + CHUNK_NBYTES)
            except BlockingIOError:
                break
            if not address or len(data) < _HEADER.size:
                self.stats["dropped_lane_anonymous"] += 1
                continue
            incarnation, partial = self._in.get(address, (b"", bytearray()))
            if data[: _HEADER.size] != incarnation:  # a new sender at that address
                incarnation, partial = data[: _HEADER.size], bytearray()
                self._in[address] = (incarnation, partial)
            partial += memoryview(data)[_HEADER.size :]
            self._split(address, partial, messages)
        return messages

    def _split(self, address: bytes, partial: bytearray, into: list[tuple[bytes, bytes]]) -> None:
        start = 0
        while len(partial) - start >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(partial, start)
            if n > MAX_MESSAGE_NBYTES:  # not our framing: drop the stream so far
                self.stats["dropped_lane_framing"] += 1
                partial.clear()
                return
            end = start + _LENGTH.size + n
            if end > len(partial):
                break
            into.append((address, bytes(partial[start + _LENGTH.size : end])))
            start = end
        del partial[:start]

    def close(self) -> None:
        self._sock.close()
        self._out.clear()
        self._in.clear()


def lane_bound(address: bytes) -> bool:
    """Whether a lane is bound at `address` (its owner lives): a connect, nothing sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # something is bound there that we may not reach: assume it lives
            return True
    return True
