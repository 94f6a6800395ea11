"""The sender side of the ZeroMQ KV transport (a mixin of ZmqTransport); runs in prefill
worker processes, and carries any side's control messages.

`send_kv` takes the peer's data connection when it is open (data_path.py); otherwise a
transfer is queued per peer (outbox.py) as page plans that become [KVHeader, raw part, ...]
ZeroMQ messages at the head of the queue, then its RoomStatus.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Event,
    PeerId,
    PeerLost,
    PeerUnreachable,
    SendHandle,
    TransportError,
    TransportOptions,
)
from pdserve.disagg.transfer.zmq.data_links import DataLinks
from pdserve.disagg.transfer.zmq.outbox import KVSend, Outbox, Outgoing, Staging, gather
from pdserve.disagg.transfer.zmq.pages import plan_frames, runs


class ZmqSender:
    """Outbound methods of ZmqTransport, which sets the attributes below and provides
    `_check_open`, `_page_pairs`, `_lose` and the data path's `_send_kv_on` and
    `_flush_channel`."""

    options: TransportOptions
    page_nbytes: int
    _sock: zmq.Socket
    _links: DataLinks
    _outbox: Outbox
    _staging: Staging
    _staging_blocked: bool
    _pages: torch.Tensor
    _pages_np: np.ndarray
    _pages_per_frame: int
    _held_until: dict[PeerId, float]
    _kv_sends: dict[int, KVSend]  # by room, until forget_room
    _stats: Counter[str]

    def send_kv(
        self,
        peer: PeerId,
        room: int,
        src_page_ids: list[int],
        dst_page_ids: list[int],
        then: m.RoomStatus,
    ) -> SendHandle:
        self._check_open()
        src, dst = self._page_pairs(src_page_ids, dst_page_ids)
        channel = self._links.senders.get(peer)
        if channel is not None:
            handle = self._send_kv_on(channel, room, src, dst, then)
        else:
            # The RoomStatus is the room's too: forget_room drops it while it is queued.
            items = [*self._kv_items(room, src, dst), Outgoing(parts=[m.encode(then)])]
            handle = KVSend(room, len(items))
            for item in items:
                item.handle = handle
            self._enqueue(peer, items)
        self._kv_sends[room] = handle
        return handle

    def _kv_items(self, room: int, src: np.ndarray, dst: np.ndarray) -> list[Outgoing]:
        """One queued item per raw frame; the fake backend overrides this."""
        return [Outgoing(plan=plan) for plan in plan_frames(src, dst, self._pages_per_frame)]

    def _enqueue(self, peer: PeerId, items: list[Outgoing]) -> None:
        queued = self._outbox.push(peer, items)
        if queued > self.options.max_queued_msgs:
            reason = f"peer {peer} is not reading: {queued} messages queued"
        else:
            reason = self._flush(peer)
        if reason is not None:
            self._lose(peer, reason)
            raise PeerUnreachable(reason)

    def _flush_all(self, events: list[Event]) -> None:
        self._staging_blocked = False
        now = time.monotonic()
        for peer in [p for p, c in self._links.senders.items() if c.queue]:
            reason = self._flush_channel(peer, now)
            if reason is not None:
                events.append(PeerLost(peer, reason))
        for peer in [p for p, q in self._outbox.queues.items() if q]:
            reason = self._flush(PeerId(peer))
            if reason is not None:
                self._lose(PeerId(peer), reason)
                events.append(PeerLost(PeerId(peer), reason))

    def _flush(self, peer: PeerId) -> str | None:
        """Hand queued messages to ZeroMQ until it pushes back; a reason if the peer is gone."""
        if peer in self._held_until:
            return None  # the handshake answer waits for the data connection
        queue = self._outbox.queues.get(peer)
        route = peer.encode("latin-1")
        while queue:
            item = queue[0]
            if item.parts is None and not self._build_frame(item):
                self._staging_blocked = True  # every buffer is on the wire; retried next poll
                return None
            try:
                self._sock.send_multipart([route, *item.parts], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    return f"KV peer {peer} is not connected (it exited or never connected)"
                raise TransportError(f"send to {peer} failed: {exc}") from exc
            queue.popleft()
            self._on_sent(item)
        return None

    def _build_frame(self, item: Outgoing) -> bool:
        """Turn a page plan into [header, raw part, ...]; False if no staging buffer is free."""
        plan, handle = item.plan, item.handle
        assert plan is not None and handle is not None
        src_runs = runs(plan.src)
        if len(src_runs) * self.options.zero_copy_min_nbytes <= plan.num_pages * self.page_nbytes:
            # Long runs: one part per run, sent straight from the pool (ZeroMQ reads it later).
            bodies = [self._pages_np[plan.src[i] : plan.src[i] + n] for i, n in src_runs]
            counts = [n for _, n in src_runs]
        else:
            index = self._staging.acquire()
            if index is None:
                return False
            item.staging_index = index
            bodies = [gather(self._pages, plan.src, self._staging.buffer(index))]
            counts = [plan.num_pages]
        header = m.KVHeader(
            room=handle.room,
            frame_page_counts=counts,
            page_nbytes=self.page_nbytes,
            dst_page_ids=plan.dst.tolist(),
        )
        frames = [zmq.Frame(body, track=True, copy=False) for body in bodies]
        item.parts = [m.encode(header), *frames]
        return True

    def _on_sent(self, item: Outgoing) -> None:
        self._stats["msgs_out"] += 1
        trackers = [part.tracker for part in item.parts if isinstance(part, zmq.Frame)]
        if item.staging_index is not None:
            self._staging.hold(item.staging_index, trackers[0])
        if item.handle is not None:
            in_place = item.plan is not None and item.staging_index is None
            item.handle.sent(trackers, item.plan.src.tolist() if in_place else [])
        if item.plan is not None:
            self._stats["kv_bytes_out"] += item.plan.num_pages * self.page_nbytes
