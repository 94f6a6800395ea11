"""ZeroMQ KV transport, the default backend; one per prefill or decode worker process.

Each transport has ONE ROUTER socket: it binds when listening (prefill) and connects to
peers under their endpoint as alias (decode), so the worker loop polls one stable socket.
Page bytes travel on a raw TCP data connection per peer, opened when decode handshakes
(data_links.py): records of [KVHeader, page bytes], then the RoomStatus, in order. Until it
is open, or where it cannot be, a transfer is a series of [KVHeader, raw part, ...] ZeroMQ
messages, then its RoomStatus.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter

import msgspec
import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Event,
    Inbound,
    KVReceived,
    KVTransport,
    PeerId,
    PeerLost,
    PeerUnreachable,
    SendHandle,
    TransportError,
    TransportOptions,
)
from pdserve.disagg.transfer.data_links import DataLinks
from pdserve.disagg.transfer.data_path import DataPath, fail_records
from pdserve.disagg.transfer.data_records import PageRecords
from pdserve.disagg.transfer.malloc_tuning import keep_freed_memory
from pdserve.disagg.transfer.outbox import KVSend, Outbox, Outgoing, Staging, gather
from pdserve.disagg.transfer.pages import WriteGrants, page_array, plan_frames, run_start, runs

log = logging.getLogger(__name__)

MAX_FRAME_NBYTES = 64 << 20  # receivers accept frames up to this, whatever the sender's option
_MAX_MSGS_PER_POLL = 4096


class ZmqTransport(DataPath, KVTransport):
    name = "zmq"
    moves_bytes = True

    def __init__(
        self,
        pool: torch.Tensor,
        *,
        listen_host: str | None = None,
        advertise_host: str | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        super().__init__(pool, listen_host=listen_host)
        if pool.device.type != "cpu":
            raise ValueError("the zmq KV transport needs a CPU pool (GPU staging is not built)")
        self.options = options or TransportOptions()
        if self.options.keep_freed_memory:
            keep_freed_memory()
        self._pages = pool.view(torch.uint8).view(self.num_pages, self.page_nbytes)
        self._pages_np = self._pages.numpy()
        self._pages_per_frame = max(
            1, min(self.options.frame_nbytes, MAX_FRAME_NBYTES) // self.page_nbytes
        )
        self._staging = Staging(
            self.options.staging_buffers, self._pages_per_frame, self.page_nbytes
        )
        self._records = PageRecords(
            self._pages, self._pages_per_frame, self.options.zero_copy_min_nbytes
        )
        self._outbox = Outbox()
        self._held_until: dict[PeerId, float] = {}  # peers whose data connection is coming
        self._grants = WriteGrants()
        self._stats: Counter[str] = Counter()
        self._connected: set[str] = set()
        self._closed = False
        self._staging_blocked = False
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._make_socket()
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._endpoint = self._bind(listen_host, advertise_host) if listen_host else None
        offers = self.moves_bytes and self.options.data_channel and listen_host is not None
        self._links = DataLinks(listen_host if offers else None, self.options.heartbeat_timeout_s)
        self._poller = zmq.Poller()
        self._poller.register(self._links.fileno(), zmq.POLLIN)

    def _make_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        # Without MANDATORY a ROUTER silently drops what it cannot route or what exceeds HWM.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTING_ID, b"kv-" + uuid.uuid4().hex.encode())
        sock.setsockopt(zmq.SNDHWM, self.options.send_hwm_msgs)
        sock.setsockopt(zmq.RCVHWM, self.options.recv_hwm_msgs)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_nbytes())
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
        # ZMTP heartbeats run in libzmq's I/O thread: they detect a dead or frozen peer
        # within the timeout even while this worker's Python loop is busy computing.
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.options.heartbeat_interval_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.options.heartbeat_timeout_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.options.heartbeat_timeout_s * 1000))
        return sock

    def _max_message_nbytes(self) -> int:
        return max(MAX_FRAME_NBYTES, self.page_nbytes, 16 * self.num_pages) + (1 << 20)

    def _bind(self, host: str, advertise_host: str | None) -> str:
        self._sock.bind(f"tcp://{host}:*")
        port = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        return f"tcp://{advertise_host or host}:{port}"

    # -- the interface -----------------------------------------------------------------
    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def connect(self, endpoint: str) -> PeerId:
        self._check_open()
        if endpoint not in self._connected:
            if not endpoint.startswith("tcp://"):
                raise ValueError(f"KV endpoint must look like tcp://host:port, got {endpoint!r}")
            # The alias makes the peer routable at once, before TCP connects.
            self._sock.setsockopt(zmq.CONNECT_ROUTING_ID, endpoint.encode())
            try:
                self._sock.connect(endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"bad KV endpoint {endpoint!r}: {exc}") from exc
            self._connected.add(endpoint)
        return PeerId(endpoint)

    def send(self, peer: PeerId, msg: m.ChannelMsg) -> None:
        self._check_open()
        if isinstance(msg, m.PageList):
            page_array(msg.dst_page_ids, self.num_pages, "PageList.dst_page_ids")
            self._grants.grant(peer, msg.room, msg.dst_page_ids)
        elif isinstance(msg, m.Abort):
            self._grants.revoke(msg.room)
        self._enqueue(peer, [Outgoing(parts=[m.encode(msg)])])

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
            return self._send_kv_on(channel, room, src, dst, then)
        items = self._kv_items(room, src, dst)
        handle = KVSend(room, len(items))
        for item in items:
            item.handle = handle
        self._enqueue(peer, [*items, Outgoing(parts=[m.encode(then)])])
        return handle

    def poll(self, timeout_ms: int = 0) -> list[Event]:
        events: list[Event] = []
        if self._closed:
            return events
        self._flush_all(events)
        if timeout_ms > 0:
            self._wait(timeout_ms)
            self._flush_all(events)
        # Data sockets first: a token read now lets a page list read below use its channel.
        budget_nbytes = self._drain_links(events, self.options.recv_budget_nbytes)
        self._drain(events, budget_nbytes)
        self._drain_monitor(events)
        return events

    def _drain_monitor(self, events: list[Event]) -> None:
        """A connection this side made dropped (the peer died, or missed heartbeats): its
        rooms can never complete. ZeroMQ reconnects by itself for later rooms."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            endpoint = event.get("endpoint", b"").decode(errors="replace")
            if endpoint in self._connected:
                reason = (
                    f"connection to {endpoint} closed (the peer died, or sent no "
                    f"heartbeat for {self.options.heartbeat_timeout_s:g}s)"
                )
                self._lose(PeerId(endpoint), reason)
                events.append(PeerLost(PeerId(endpoint), reason))

    def _wait(self, timeout_ms: int) -> None:
        """Sleep until a message or data arrives or, if sends are queued, until they can move
        on. Data connections with bytes to write wake the data selector by themselves."""
        flags = zmq.POLLIN
        if self._held_until:  # wake when a held peer's data connection is given up on
            wait_s = min(self._held_until.values()) - time.monotonic()
            timeout_ms = max(0, min(timeout_ms, int(wait_s * 1000) + 1))
        if self._outbox_movable():
            if self._staging_blocked:  # waits for ZeroMQ to let go of a buffer: no event
                timeout_ms = min(timeout_ms, 1)
            else:  # waits for room under the high-water mark
                flags |= zmq.POLLOUT
        self._poller.register(self._sock, flags)
        self._poller.poll(timeout_ms)

    def _outbox_movable(self) -> bool:
        """Whether ZeroMQ messages wait that a poll can move on (held ones wait for an event)."""
        return any(q and p not in self._held_until for p, q in self._outbox.queues.items())

    def forget_room(self, room: int) -> None:
        self._grants.revoke(room)

    def busy(self) -> bool:
        return self._outbox_movable() or any(c.queue for c in self._links.senders.values())

    def sockets(self) -> list[zmq.Socket | int]:
        return [] if self._closed else [self._sock, self._monitor, self._links.fileno()]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for peer in list(self._outbox.queues):
                self._outbox.drop_peer(peer, "transport closed", self._staging)
            for channel in self._links.close():
                fail_records(channel.queue, "transport closed")
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats + self._links.stats)

    # -- outbound over ZeroMQ ------------------------------------------------------------
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
        self._release_expired_holds(now)
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
            item.handle.sent(trackers)
        if item.plan is not None:
            self._stats["kv_bytes_out"] += item.plan.num_pages * self.page_nbytes

    def _lose(self, peer: PeerId, reason: str) -> None:
        log.warning("KV peer lost: %s", reason)
        self._outbox.drop_peer(peer, reason, self._staging)
        self._grants.revoke_peer(peer)
        self._held_until.pop(peer, None)
        channel = self._links.close_peer(peer)
        if channel is not None:
            fail_records(channel.queue, reason)

    # -- inbound -------------------------------------------------------------------------
    def _drain(self, events: list[Event], budget_nbytes: int) -> None:
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

    def _page_pairs(self, src_page_ids: list[int], dst_page_ids: list[int]):
        """Validated (src, dst) page arrays of one send_kv; ValueError on bad ids."""
        src = page_array(src_page_ids, self.num_pages, "src_page_ids")
        dst = np.asarray(dst_page_ids, dtype=np.int64)
        if dst.ndim != 1 or dst.size != src.size:
            raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
        return src, dst

    def _check_open(self) -> None:
        if self._closed:
            raise PeerUnreachable("the KV transport is closed")
