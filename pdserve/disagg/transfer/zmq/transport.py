"""ZeroMQ KV transport, the default backend; one per prefill or decode worker process.
The socket, the connections and the interface; its two sides are sender.py and receiver.py.

Each transport has ONE ROUTER socket: it binds when listening (prefill) and connects to
peers under their endpoint as alias (decode), so the worker loop polls one stable socket.
Page bytes travel on a raw TCP data connection per peer, opened when decode handshakes
(data_links.py): records of [KVHeader, page bytes], then the RoomStatus, in order. Until it
is open, or where it cannot be, a transfer is a series of [KVHeader, raw part, ...] ZeroMQ
messages, then its RoomStatus.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
import uuid
from collections import Counter

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve import netaddr
from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Event,
    HeldPages,
    KVTransport,
    PeerId,
    PeerLost,
    PeerUnreachable,
    TransportOptions,
)
from pdserve.disagg.transfer.zmq.data_links import DataLinks
from pdserve.disagg.transfer.zmq.data_path import DataPath, fail_records
from pdserve.disagg.transfer.zmq.data_records import PageRecords
from pdserve.disagg.transfer.zmq.malloc_tuning import keep_freed_memory
from pdserve.disagg.transfer.zmq.outbox import KVSend, Outbox, Outgoing, Staging
from pdserve.disagg.transfer.zmq.pages import WriteGrants, page_array
from pdserve.disagg.transfer.zmq.receiver import ZmqReceiver
from pdserve.disagg.transfer.zmq.sender import ZmqSender

log = logging.getLogger(__name__)

MAX_FRAME_NBYTES = 64 << 20  # receivers accept frames up to this, whatever the sender's option
_IPV4_MAPPED = re.compile(r"^tcp://\[::ffff:(\d+\.\d+\.\d+\.\d+)\]:")


class ZmqTransport(ZmqSender, ZmqReceiver, DataPath, KVTransport):
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
        self._kv_sends: dict[int, KVSend] = {}  # by room, until forget_room
        self._held = HeldPages()  # pages of forgotten rooms that sends still read
        self._stats: Counter[str] = Counter()
        # endpoint -> the alias its connection routes by (the endpoint itself, until a
        # disconnect: libzmq aborts the process when an alias is reused while the old
        # connection's pipe is still closing, so each later dial takes a fresh one)
        self._dialed: dict[str, PeerId] = {}
        self._disconnects = 0
        self._closed = False
        self._staging_blocked = False
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._make_socket()
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
        )
        self._refused: set[str] = set()  # endpoints whose last connect attempt failed
        self._next_probe = 0.0  # when the peers this side waits on are probed next
        self._endpoint = self._bind(listen_host, advertise_host) if listen_host else None
        offers = self.moves_bytes and self.options.data_channel and listen_host is not None
        self._links = DataLinks(listen_host if offers else None, self.options.heartbeat_timeout_s)
        self._poller = zmq.Poller()
        self._poller.register(self._links.fileno(), zmq.POLLIN)

    def _make_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        # Without MANDATORY a ROUTER silently drops what it cannot route or what exceeds HWM.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that connects again under its routing id (its old connection dropped while
        # this worker was stopped, and is still listed here) takes it over: refused as a
        # duplicate, the new connection stayed up, heartbeats answered, and nothing sent to
        # that id arrived again.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.ROUTING_ID, b"kv-" + uuid.uuid4().hex.encode())
        sock.setsockopt(zmq.SNDHWM, self.options.send_hwm_msgs)
        sock.setsockopt(zmq.RCVHWM, self.options.recv_hwm_msgs)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # dials IPv6 endpoints too (IPv4 ones as before)
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
        # An IPv4 host keeps an IPv4 listener (with IPV6 set, ZeroMQ made 0.0.0.0 an IPv6
        # socket, and its peers' addresses IPv4-mapped).
        self._sock.setsockopt(zmq.IPV6, int(netaddr.family(host) == socket.AF_INET6))
        self._sock.bind(f"tcp://{netaddr.url_host(host)}:*")
        port = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        return f"tcp://{netaddr.url_host(advertise_host or host)}:{port}"

    # -- the interface -----------------------------------------------------------------
    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def connect(self, endpoint: str) -> PeerId:
        self._check_open()
        peer = self._dialed.get(endpoint)
        if peer is None:
            why = netaddr.tcp_endpoint_error(endpoint)  # as the bootstrap server checks it
            if why is not None:
                raise ValueError(f"bad KV endpoint: {why}")
            # The alias makes the peer routable at once, before TCP connects.
            peer = PeerId(f"{endpoint}#{self._disconnects}" if self._disconnects else endpoint)
            self._sock.setsockopt(zmq.CONNECT_ROUTING_ID, peer.encode())
            try:
                self._sock.connect(endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"bad KV endpoint {endpoint!r}: {exc}") from exc
            self._dialed[endpoint] = peer
        return peer

    def disconnect(self, peer: PeerId) -> None:
        """ZeroMQ redials a dialed endpoint every 100 ms for the life of the socket, and
        queues what is sent there: a prefill worker that died or restarted (on new ports)
        would be dialed for good, and each restart add its workers to the list."""
        endpoint = next((e for e, p in self._dialed.items() if p == peer), None)
        if endpoint is None or self._closed:
            return
        del self._dialed[endpoint]
        self._refused.discard(endpoint)
        self._disconnects += 1
        log.info("KV peer %s no longer dialed: lost, and no longer used", endpoint)
        self._lose(peer, f"{endpoint} disconnected: lost, and no longer used", quiet=True)
        with contextlib.suppress(zmq.ZMQError):  # already gone
            self._sock.disconnect(endpoint)

    def send(self, peer: PeerId, msg: m.ChannelMsg) -> None:
        self._check_open()
        if isinstance(msg, m.PageList):
            page_array(msg.dst_page_ids, self.num_pages, "PageList.dst_page_ids")
            self._grants.grant(peer, msg.room, msg.dst_page_ids)
        elif isinstance(msg, m.Abort):
            self._grants.revoke(msg.room)
        self._enqueue(peer, [Outgoing(parts=[m.encode(msg)])])

    def poll(self, timeout_ms: int = 0) -> list[Event]:
        events: list[Event] = []
        if self._closed:
            return events
        self._flush_all(events)
        if timeout_ms > 0:
            self._wait(timeout_ms)
            self._flush_all(events)
        # Data sockets first: a token read now lets a page list read below use its channel,
        # and a connection that came while this worker was busy computing is in time.
        budget_nbytes = self._drain_links(events, self.options.recv_budget_nbytes)
        self._release_expired_holds(time.monotonic(), events)
        self._drain(events, budget_nbytes)
        self._drain_monitor(events)
        self._probe_awaited(events)
        events += self._held.settled()
        return events

    def _awaited_peers(self) -> set[PeerId]:
        """Peers whose own action (a read, an ack) ends sends of ours; backends where
        decode pulls the pages say which."""
        return set()

    def _probe_awaited(self, events: list[Event]) -> None:
        """A probe each heartbeat period to every peer whose read or ack we wait on. A
        listening socket gets no monitor event when an accepted connection drops (the peer
        died, or missed its heartbeats): ZeroMQ only removes its route, so a send there is
        how the loss is found; without it those sends would wait for their deadline."""
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + self.options.heartbeat_interval_s
        for peer in self._awaited_peers():
            reason = self._probe(peer)
            if reason is not None:
                events.append(PeerLost(peer, reason))

    def _drain_monitor(self, events: list[Event]) -> None:
        """A connection this side made dropped (the peer died, or missed heartbeats), or
        could not be made (nothing listens there): its rooms can never complete, so they
        fail now instead of at their deadline. ZeroMQ keeps reconnecting in the background
        (every 100 ms), so a restarted peer is usable as soon as it listens again."""
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a failed recv
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            endpoint = _as_dialed(event.get("endpoint", b"").decode(errors="replace"))
            peer = self._dialed.get(endpoint)
            if peer is None:
                continue
            if event["event"] == zmq.EVENT_CONNECTED:
                self._refused.discard(endpoint)
                continue
            if event["event"] == zmq.EVENT_CONNECT_RETRIED:
                reason = f"cannot connect to {endpoint} (is the prefill server down?)"
                if endpoint in self._refused:  # still down: fail new rooms, log once
                    events.append(PeerLost(peer, reason))
                    continue
                self._refused.add(endpoint)
            else:
                reason = (
                    f"connection to {endpoint} closed (the peer died, or sent no "
                    f"heartbeat for {self.options.heartbeat_timeout_s:g}s)"
                )
            self._lose(peer, reason)
            events.append(PeerLost(peer, reason))

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

    def forget_room(self, room: int) -> list[int]:
        self._grants.revoke(room)  # checked before every read into a page: none goes on
        handle = self._kv_sends.pop(room, None)
        if handle is None or (handle.messages_left == 0 and not handle.in_flight()):
            return []  # no send, or all of it written and let go (a room that succeeded)
        # What of the room's send has not started is dropped, its RoomStatus included;
        # zero-copy frames ZeroMQ holds and a record half written still read their pages.
        self._outbox.drop_room(room, self._staging)
        held = self._drop_room_records(room)
        for trackers, page_ids in handle.in_flight():
            held += self._held.hold(page_ids, lambda ts=trackers: all(t.done for t in ts))
        return held

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

    def _lose(self, peer: PeerId, reason: str, quiet: bool = False) -> None:
        """Forget what is queued for `peer` and fail its transfers; `quiet`: no WARNING (a
        peer this side let go of, whose loss was logged when it happened)."""
        if not quiet:
            log.warning("KV peer lost: %s", reason)
        self._outbox.drop_peer(peer, reason, self._staging)
        self._grants.revoke_peer(peer)
        self._held_until.pop(peer, None)
        channel = self._links.close_peer(peer)
        if channel is not None:
            fail_records(channel.queue, reason)

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


def _as_dialed(endpoint: str) -> str:
    """A monitor event's endpoint as it was dialed. Once ZeroMQ has reconnected, it names an
    IPv4 peer in the IPv4-mapped form (`tcp://[::ffff:a.b.c.d]:port`, the socket has IPV6
    set): looked up as is, every later drop of that connection went unseen."""
    return _IPV4_MAPPED.sub(r"tcp://\1:", endpoint)
