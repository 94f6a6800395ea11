"""The data-connection half of the ZeroMQ KV transport (a mixin of ZmqTransport); runs in
worker processes.

A listening side offers every peer that handshakes a raw TCP connection (data_links.py) and
holds its other messages to that peer - the handshake answer - until the connection is open,
so every transfer after the handshake uses it. Records written there carry the pages and the
final RoomStatus; the receiver reads each record's pages straight into the granted pool pages
and stops writing the moment the grant ends. A send stalled on a silent peer is resolved by
ZeroMQ's heartbeats: a probe message fails once they have given up on the peer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

import msgspec
import numpy as np
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Event,
    HeldPages,
    PeerId,
    PeerLost,
    PeerUnreachable,
    SendHandle,
    TransportOptions,
)
from pdserve.disagg.transfer.zmq import data_channel as dc
from pdserve.disagg.transfer.zmq.data_channel import (
    ChannelClosed,
    ChannelRefused,
    OutRecord,
    Payload,
    RecvChannel,
    SendChannel,
)
from pdserve.disagg.transfer.zmq.data_links import DataLinks
from pdserve.disagg.transfer.zmq.data_records import PageRecords
from pdserve.disagg.transfer.zmq.outbox import KVSend, Outgoing
from pdserve.disagg.transfer.zmq.pages import WriteGrants

log = logging.getLogger(__name__)


class DataPath:
    """Data-connection methods of ZmqTransport, which sets the attributes below and provides
    `_enqueue`, `_flush`, `_lose`, `_on_control`, `_reject` and `_max_message_nbytes`."""

    options: TransportOptions
    page_nbytes: int
    moves_bytes: bool
    _sock: zmq.Socket
    _grants: WriteGrants
    _stats: Counter[str]
    _dialed: dict[str, PeerId]  # endpoint -> the alias its connection routes by
    _links: DataLinks
    _records: PageRecords
    _held_until: dict[PeerId, float]  # peers whose data connection is coming
    _held: HeldPages

    # -- outbound over the data connection -----------------------------------------------
    def _send_kv_on(
        self,
        channel: SendChannel,
        room: int,
        src: np.ndarray,
        dst: np.ndarray,
        then: m.RoomStatus,
    ) -> SendHandle:
        records = [OutRecord(plan=plan) for plan in self._records.plan(src, dst)]
        records.append(OutRecord(message=m.encode(then)))
        handle = KVSend(room, len(records))
        for record in records:
            record.handle = handle
        channel.queue += records
        reason = self._flush_channel(PeerId(channel.peer), time.monotonic())
        if reason is not None:
            raise PeerUnreachable(reason)
        return handle

    def _drop_room_records(self, room: int) -> list[int]:
        """The room's records not started leave the data connections' queues. One half
        written stays (the stream's framing needs its rest): its pages are held until it is
        written or its connection closes. Returns the held pages."""
        held: list[int] = []
        for peer, channel in self._links.senders.items():
            kept: deque[OutRecord] = deque()
            for record in channel.queue:
                mine = record.handle is not None and record.handle.room == room
                started = record.cursor is not None and record.cursor.done_nbytes > 0
                if mine and started and record.plan is not None:
                    held += self._held.hold(record.plan.src.tolist(), self._written(record, peer))
                if started or not mine:
                    kept.append(record)
            channel.queue = kept
            self._links.want_write(channel, bool(kept))
        return held

    def _written(self, record: OutRecord, peer: str) -> Callable[[], bool]:
        """Whether the record was written in full, or its connection is gone."""
        channel = self._links.senders[peer]
        return lambda: record.cursor.finished or self._links.senders.get(peer) is not channel

    def _release_expired_holds(self, now: float, events: list[Event]) -> None:
        """Peers that opened no data connection in time: what was held leaves now, and their
        KV goes as ZeroMQ frames. Called after the data sockets were read in the same poll."""
        for peer in [p for p, until in self._held_until.items() if now >= until]:
            del self._held_until[peer]
            log.warning("KV peer %s opened no data connection; its KV goes over ZeroMQ", peer)
            reason = self._flush(peer)
            if reason is not None:
                self._lose(peer, reason)
                events.append(PeerLost(peer, reason))

    def _offer_data_channel(self, peer: PeerId) -> None:
        """Decode handshakes: offer it a data connection, and hold what follows (the handshake
        answer) until that connection is open, so every transfer after it can use it."""
        channel = self._links.close_peer(peer)
        if channel is not None:  # a handshake again: decode gave up on the rooms it carried
            fail_records(channel.queue, "decode handshook again")
        offer = self._links.offer(peer, time.monotonic())
        try:
            self._enqueue(peer, [Outgoing(parts=[dc.encode(offer)])])
        except PeerUnreachable:
            return
        self._held_until[peer] = time.monotonic() + self.options.heartbeat_timeout_s

    def _flush_channel(self, peer: PeerId, now: float) -> str | None:
        """Write what the socket takes; a reason (the peer is then lost) if it broke."""
        channel = self._links.senders[peer]
        try:
            written = channel.flush(lambda record: self._records.lay_out(record, channel), now)
        except ChannelClosed as exc:
            reason = f"KV data connection to {peer}: {exc}"
            self._lose(peer, reason)
            return reason
        for record in written:
            if record.handle is not None:
                record.handle.sent([], [])
            if record.plan is not None:
                nbytes = record.plan.num_pages * self.page_nbytes
                self._stats["kv_bytes_out"] += nbytes
                self._stats["data_kv_bytes_out"] += nbytes
        self._links.want_write(channel, bool(channel.queue))
        stalled_since = channel.stalled_since
        if stalled_since is not None and now - stalled_since >= self.options.heartbeat_interval_s:
            channel.stalled_since = now  # probe once per interval
            return self._probe(peer)
        return None

    def _probe(self, peer: PeerId) -> str | None:
        """A send stalled or awaiting the peer cannot tell a busy peer from a dead one;
        ZeroMQ's heartbeats can: once they have given up, the peer is no longer routable."""
        try:
            self._sock.send_multipart(
                [peer.encode("latin-1"), dc.encode(dc.DataProbe())], zmq.NOBLOCK
            )
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            reason = f"KV peer {peer} is not connected ({exc}) while its KV was under way"
            self._lose(peer, reason)
            return reason
        self._stats["data_probes_out"] += 1
        return None

    # -- inbound -------------------------------------------------------------------------
    def _on_data_message(self, peer: PeerId, parts: list[zmq.Frame]) -> int:
        """A message of the data-connection set-up, or garbage."""
        try:
            msg = dc.decode(parts[0].buffer)
        except msgspec.MsgspecError:
            return self._reject(peer, "undecodable")
        if len(parts) != 1:
            return self._reject(peer, "extra_frames")
        if isinstance(msg, dc.DataProbe):
            self._stats["data_probes_in"] += 1
        elif peer in self._dialed.values() and self.moves_bytes:  # from a peer we dialled
            # The alias is the endpoint, with '#n' after the port once redialled
            host = peer.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
            self._links.connect(peer, host, msg, self._max_message_nbytes())
        else:
            return self._reject(peer, "data_offer")
        return 0

    def _drain_links(self, events: list[Event], budget_nbytes: int) -> int:
        """Accept, authenticate and read data connections; returns the budget left."""
        link_events = self._links.poll(time.monotonic())
        for peer in link_events.opened:
            self._held_until.pop(PeerId(peer), None)
            self._flush(PeerId(peer))  # what was held: the handshake answer
        for peer, reason in link_events.failed:
            # The decode peer closed its data connection: it died (or dropped us), so its
            # rooms fail now, also those whose KV was not being sent yet (their pages would
            # otherwise wait for a request or a send that can never reach it).
            self._links.close_peer(peer)
            reason = f"KV data connection to {peer}: {reason}"
            self._lose(PeerId(peer), reason)
            events.append(PeerLost(PeerId(peer), reason))
        for channel in link_events.readable:
            budget_nbytes -= self._read_channel(channel, events, budget_nbytes)
        return budget_nbytes

    def _read_channel(self, channel: RecvChannel, events: list[Event], budget: int) -> int:
        peer = PeerId(channel.peer)
        try:
            return channel.read(budget, lambda message: self._on_record(channel, message, events))
        except ChannelRefused as exc:
            # Prefill gave up waiting for this connection (its worker was busy past the hold)
            # and sends over ZeroMQ: nothing was lost, no room fails.
            log.warning("KV data connection from %s not used: %s; KV comes over ZeroMQ", peer, exc)
            self._stats["data_channels_refused"] += 1
            self._links.close_peer(peer)
            return 0
        except ChannelClosed as exc:
            reason = f"KV data connection from {peer}: {exc}"
            self._lose(peer, reason)
            events.append(PeerLost(peer, reason))
            return 0

    def _on_record(
        self, channel: RecvChannel, message: memoryview, events: list[Event]
    ) -> Payload | None:
        peer = PeerId(channel.peer)
        try:
            msg = m.decode(message)
        except msgspec.MsgspecError as exc:
            raise ChannelClosed("undecodable record") from exc
        self._stats["data_records_in"] += 1
        if isinstance(msg, m.RoomStatus):
            self._on_control(peer, msg, events)
            return None
        if not isinstance(msg, m.KVHeader):
            raise ChannelClosed(f"a {type(msg).__name__} record")
        return self._kv_payload(channel, msg)

    def _kv_payload(self, channel: RecvChannel, header: m.KVHeader) -> Payload:
        """Where a KV record's pages go: the granted pool pages, or nowhere (dropped)."""
        counts, peer = header.frame_page_counts, PeerId(channel.peer)
        nbytes = sum(counts) * header.page_nbytes
        if min(counts, default=0) < 0 or not 0 <= nbytes <= dc.MAX_RECORD_NBYTES:
            raise ChannelClosed(f"a KV record of {nbytes} bytes")  # framing can't be trusted
        reason = self._grants.check(peer, header, [nbytes], self.page_nbytes, True)
        if reason is not None:
            self._reject(peer, "kv_" + reason)
            return Payload(nbytes)
        grant = self._grants.get(header.room)
        dst = np.asarray(header.dst_page_ids, dtype=np.int64)
        cursor, scatter = self._records.sink(dst, channel)

        def finish() -> None:
            if scatter is not None:
                scatter()
            self._grants.record(header.room, header.dst_page_ids, nbytes)
            self._stats["kv_bytes_in"] += nbytes
            self._stats["data_kv_bytes_in"] += nbytes

        # A grant revoked meanwhile (abort, deadline) ends the writes: the pages may be reused.
        return Payload(nbytes, cursor, lambda: self._grants.get(header.room) is grant, finish)


def fail_records(records: Iterable[OutRecord], reason: str) -> None:
    for record in records:
        if record.handle is not None:
            record.handle.fail(reason)
