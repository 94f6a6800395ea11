"""The receiver side of the ZeroMQ KV transport (a mixin of ZmqTransport); runs in decode
worker processes, and reads any side's control messages.

Inbound ZeroMQ messages are control messages or [KVHeader, raw part, ...]; page bytes are
checked against the room's write grant (pages.py) and written straight into the pool.
Records on the data connection arrive through data_path.py.
"""

from __future__ import annotations

import logging
from collections import Counter

import msgspec
import numpy as np
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import Event, Inbound, KVReceived, PeerId
from pdserve.disagg.transfer.zmq.data_links import DataLinks
from pdserve.disagg.transfer.zmq.pages import WriteGrants, run_start

log = logging.getLogger(__name__)

_MAX_MSGS_PER_POLL = 4096


class ZmqReceiver:
    """Inbound methods of ZmqTransport, which sets the attributes below and provides the
    data path's `_on_data_message` and `_offer_data_channel`."""

    name: str
    moves_bytes: bool
    page_nbytes: int
    _sock: zmq.Socket
    _links: DataLinks
    _grants: WriteGrants
    _pages_np: np.ndarray
    _stats: Counter[str]

    def _drain(self, events: list[Event], budget_nbytes: int) -> None:
        if not self._sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a failed recv
            return
        for _ in range(_MAX_MSGS_PER_POLL):
            if budget_nbytes <= 0:
                return
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer = PeerId(parts[0].bytes.decode("latin-1"))
            budget_nbytes -= self._on_message(peer, parts[1:], events)

    def _on_message(self, peer: PeerId, parts: list[zmq.Frame], events: list[Event]) -> int:
        """Handle one inbound message; returns the KV bytes it wrote."""
        self._stats["msgs_in"] += 1
        if not parts:
            return self._reject(peer, "empty")
        try:
            msg = m.decode(parts[0].buffer)
        except msgspec.MsgspecError:
            return self._on_data_message(peer, parts)
        if isinstance(msg, m.KVHeader):
            return self._on_kv(peer, msg, parts[1:])
        if len(parts) != 1:
            return self._reject(peer, "extra_frames")
        if isinstance(msg, m.Handshake) and msg.backend == self.name and self._links.can_offer:
            self._offer_data_channel(peer)
        self._on_control(peer, msg, events)
        return 0

    def _on_control(self, peer: PeerId, msg: m.ChannelMsg, events: list[Event]) -> None:
        if isinstance(msg, m.RoomStatus):
            grant = self._grants.revoke(msg.room, peer)
            if grant is not None and msg.ok:
                events.append(
                    KVReceived(
                        peer, msg.room, len(grant.received), grant.nbytes, len(grant.allowed)
                    )
                )
        elif isinstance(msg, m.Abort):
            self._grants.revoke(msg.room, peer)
        events.append(Inbound(peer, msg))

    def _on_kv(self, peer: PeerId, header: m.KVHeader, frames: list[zmq.Frame]) -> int:
        sizes = [len(f) for f in frames]
        reason = self._grants.check(peer, header, sizes, self.page_nbytes, self.moves_bytes)
        if reason is not None:
            return self._reject(peer, "kv_" + reason)
        nbytes = self._write_pages(header, frames)
        self._grants.record(header.room, header.dst_page_ids, nbytes)
        self._stats["kv_bytes_in"] += nbytes
        return nbytes

    def _write_pages(self, header: m.KVHeader, frames: list[zmq.Frame]) -> int:
        dst = np.asarray(header.dst_page_ids, dtype=np.int64)
        start = 0
        for count, frame in zip(header.frame_page_counts, frames, strict=True):
            ids = dst[start : start + count]
            start += count
            src = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(count, self.page_nbytes)
            first = run_start(ids)
            if first is not None:
                self._pages_np[first : first + count] = src
            else:
                self._pages_np[ids] = src  # numpy scatter: ~memcpy speed, no per-page loop
        return start * self.page_nbytes

    def _reject(self, peer: PeerId, reason: str) -> int:
        self._stats["dropped_" + reason] += 1
        log.debug("dropped a message from KV peer %r: %s", peer, reason)
        return 0
