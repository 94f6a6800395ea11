"""Control messages of a ZeroMQ-based transport on the one-host lane (ipc_lane.py) instead of
its ZeroMQ socket; the cuda_ipc backend uses it. Runs in prefill and decode worker processes.

Every control message to a peer goes on the lane: it leaves in one system call, or waits in
order while the peer's queue is full. Inbound lane messages take the ZeroMQ receive path
(`_on_message`), so grants, statuses and events are the host transport's. The ZeroMQ
connection stays up for its heartbeats: it is how a silent peer is lost.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import zmq

from pdserve.disagg.transfer.base import (
    Event,
    PeerId,
    PeerLost,
    PeerUnreachable,
    TransportOptions,
)
from pdserve.disagg.transfer.ipc_lane import (
    MAX_QUEUED_NBYTES,
    Lane,
    LaneGone,
    lane_address,
    owner_of,
)
from pdserve.disagg.transfer.zmq.outbox import Outgoing

# After a lane spin found work, poll returns it at once, reading the ZeroMQ socket (the
# zmq half of a poll: tens of microseconds of Python) only if it was last read this long ago.
ZMQ_MAX_SKIP_S = 0.001


class LaneControl:
    """Listed before a ZmqTransport subclass: `class T(LaneControl, FakeTransport)`. With
    `options.ipc_lane` off it changes nothing."""

    options: TransportOptions
    endpoint: str | None
    _sock: zmq.Socket
    _poller: zmq.Poller
    _closed: bool
    _stats: Counter[str]

    def __init__(self, pool: Any, **kwargs: Any) -> None:
        super().__init__(pool, **kwargs)
        self._lane: Lane | None = None
        self._peer_of_address: dict[bytes, PeerId] = {}  # lanes whose name is hashed
        self._zmq_read_at = 0.0  # perf_counter of the last poll of the ZeroMQ half
        if self.options.ipc_lane:
            # A listening side is known by its endpoint, a connecting one by its routing id.
            own_id = self.endpoint or self._sock.getsockopt(zmq.ROUTING_ID).decode()
            self._lane = Lane(own_id)
            self._poller.register(self._lane.fileno(), zmq.POLLIN)

    def connect(self, endpoint: str) -> PeerId:
        peer = super().connect(endpoint)
        self._peer_of_address[lane_address(peer)] = peer
        return peer

    def poll(self, timeout_ms: int = 0) -> list[Event]:
        events: list[Event] = []
        self._flush_lane(events)
        if self._lane is not None and self._lane.queued_nbytes():
            timeout_ms = min(timeout_ms, 1)  # a full peer queue raises no event when it drains
        if timeout_ms > 0 and self._spin(events):
            if time.perf_counter() - self._zmq_read_at < ZMQ_MAX_SKIP_S:
                return events  # the spin drained the lane; the ZeroMQ half waits a turn
            timeout_ms = 0
        events += super().poll(timeout_ms)
        self._zmq_read_at = time.perf_counter()
        self._drain_lane(events)
        return events

    def busy(self) -> bool:
        return super().busy() or (self._lane is not None and self._lane.queued_nbytes() > 0)

    def sockets(self) -> list[zmq.Socket | int]:
        lane = [] if self._lane is None or self._closed else [self._lane.fileno()]
        return super().sockets() + lane

    def close(self) -> None:
        if self._lane is not None and not self._closed:
            self._lane.close()
        super().close()

    @property
    def stats(self) -> dict[str, int]:
        lane = self._lane.stats if self._lane is not None else {}
        return super().stats | dict(lane)

    def _lose(self, peer: PeerId, reason: str, quiet: bool = False) -> None:
        super()._lose(peer, reason, quiet)
        if self._lane is not None:
            self._lane.forget(lane_address(peer))

    def _enqueue(self, peer: PeerId, items: list[Outgoing]) -> None:
        """Control messages are one part each; on the lane one leaves now, or waits here
        in order while the peer's queue is full."""
        if self._lane is None:
            return super()._enqueue(peer, items)
        address = lane_address(peer)
        try:
            for item in items:
                assert item.parts is not None and len(item.parts) == 1, "one-part messages only"
                self._lane.send(address, item.parts[0])
                self._stats["msgs_out"] += 1
        except LaneGone as exc:
            reason = f"KV peer {peer} has no control lane on this host (exited?): {exc}"
        else:
            if self._lane.queued_nbytes(address) <= MAX_QUEUED_NBYTES:
                return None
            reason = f"KV peer {peer} is not reading: {MAX_QUEUED_NBYTES} bytes queued"
        self._lose(peer, reason)
        raise PeerUnreachable(reason)

    def _flush_lane(self, events: list[Event]) -> None:
        if self._lane is None:
            return
        for address, reason in self._lane.flush():
            peer = self._peer_at(address)
            if peer is not None:
                self._lose(peer, reason)
                events.append(PeerLost(peer, reason))

    def _drain_lane(self, events: list[Event]) -> int:
        """Handle every message that came on the lane; returns how many."""
        messages = self._lane.receive() if self._lane is not None else []
        for address, payload in messages:
            peer = self._peer_at(address)
            if peer is None:
                self._stats["dropped_lane_sender"] += 1
            else:
                self._on_message(peer, [zmq.Frame(payload)], events)
        return len(messages)

    def _spin(self, events: list[Event]) -> bool:
        """Read the lane without sleeping, for up to lane_spin_us: True once anything came
        (there, or through `_spin_found`)."""
        if self._lane is None or self._closed:
            return False
        deadline = time.perf_counter() + self.options.lane_spin_us * 1e-6
        while time.perf_counter() < deadline:
            if self._drain_lane(events) or self._spin_found(events):
                return True
        return False

    def _spin_found(self, events: list[Event]) -> bool:
        """What else a spin watches (cuda_ipc: its completion slots); True once it found
        something, which it adds to `events`."""
        return False

    def _peer_at(self, address: bytes) -> PeerId | None:
        peer = self._peer_of_address.get(address)
        if peer is None:
            owner = owner_of(address)
            peer = PeerId(owner) if owner is not None else None
        return peer
