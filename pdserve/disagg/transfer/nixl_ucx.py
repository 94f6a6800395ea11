"""KV transport over NIXL (UCX): decode READs each room's pages from prefill's registered pool
into the pages it granted; control messages stay on the ZeroMQ channel. Runs in prefill and
decode worker processes under `--transfer-backend nixl`.

Each side registers its pool once (nixl_agent.py) and puts its agent metadata in the KV
handshake, where the disagg-secret proof covers it. Rooms prefill sends between two polls go
out as one `NixlBatch`; decode checks each room against its grant exactly as the zmq backend
checks frames and posts one READ per room. NIXL notifies prefill once the bytes have landed
(which frees its pages); decode then reports KVReceived and the room's status. The owner of
the destination pages issues every write into them, so nothing lands outside a grant, and a
read still under way when its room is forgotten is left to end, never cancelled (over UCX's
TCP emulation a cancelled read was seen to land once the peer resumed): `forget_room` returns
its pages, which decode keeps out of use until a `PagesSettled` event. Prefill likewise keeps
the pages of a forgotten room decode was told of until its read ends or never comes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    AckedSend,
    Event,
    PagesSettled,
    PeerId,
    PeerLost,
    SendHandle,
    TransportError,
    TransportOptions,
    forget_pulled_room,
)
from pdserve.disagg.transfer.fake_backend import FakeTransport
from pdserve.disagg.transfer.nixl_agent import NixlAgent, NixlPool, decode_pool, encode_pool
from pdserve.disagg.transfer.zmq.outbox import Outgoing
from pdserve.disagg.transfer.zmq.pages import page_array

log = logging.getLogger(__name__)


class NixlCopy(msgspec.Struct, kw_only=True):
    """Read my pages `src_page_ids` into your `dst_page_ids` for `room`, then `status`."""

    room: int
    src_page_ids: list[int]
    dst_page_ids: list[int]
    status: m.RoomStatus  # what a separate RoomStatus message would say after the KV


class NixlBatch(msgspec.Struct, tag="nixl_batch", kw_only=True):
    """prefill -> decode: the rooms sent to this peer since the last poll, in order."""

    copies: list[NixlCopy]


class NixlDone(msgspec.Struct, tag="nixl_done", kw_only=True):
    """decode -> prefill: `rooms` will not be read (refused, failed, or no pages): free them.
    A completed read is announced by its NIXL notification instead."""

    rooms: list[int]
    error: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(NixlBatch | NixlDone)


class NixlSend(AckedSend):
    """One send_kv: done when decode's read notifies us, decode gives it up, it is lost, or
    `deadline` (monotonic s) passes: a decode that died quietly never reads."""

    def __init__(self, room: int, page_ids: list[int], deadline: float) -> None:
        super().__init__(room, page_ids)
        self.deadline = deadline


@dataclass
class Read:
    """A READ decode posted for one room; `handle` is None when there was nothing to read."""

    peer: PeerId
    copy: NixlCopy
    handle: object | None


class NixlTransport(FakeTransport):
    """The fake backend's control flow (grants, RoomStatus, KVReceived) with NIXL reads in
    place of its byte-less KVHeader. The base class sees a one-byte-per-page shadow pool."""

    name = "nixl"

    def __init__(
        self,
        pool: torch.Tensor,
        *,
        listen_host: str | None = None,
        advertise_host: str | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        if not pool.is_contiguous():
            raise ValueError("the nixl KV transport needs a contiguous pool")
        shadow = torch.zeros(pool.shape[0], 1, dtype=torch.uint8)
        super().__init__(
            shadow, listen_host=listen_host, advertise_host=advertise_host, options=options
        )
        self.pool = pool
        self.page_nbytes = pool[0].numel() * pool.element_size()
        self._agent = NixlAgent(pool.view(torch.uint8).view(self.num_pages, self.page_nbytes))
        self._meta: bytes | None = None
        self._peer_pools: dict[PeerId, NixlPool] = {}  # decode: pools we may read from
        self._peer_of_agent: dict[str, PeerId] = {}  # prefill: who may notify us
        self._sends: dict[tuple[PeerId, int], NixlSend] = {}
        self._batches: dict[PeerId, list[NixlCopy]] = {}  # sent at the next poll
        self._reads: dict[int, Read] = {}
        # Reads of forgotten rooms that have not ended: their pages stay out of use.
        self._settling: dict[int, Read] = {}
        self._remove_later: set[PeerId] = set()  # lost peers that settling reads still use
        # Peers decode stopped using while reads on their agent settle: still dialed (under
        # the same key) until those end. Dialed anew under another key, the peer's agent
        # would be loaded twice, which NIXL refuses.
        self._disconnect_later: set[PeerId] = set()

    # -- the handshake -------------------------------------------------------------------
    def handshake_meta(self) -> bytes:
        if self._meta is None:
            self._meta = encode_pool(self._agent.pool_info())
        return self._meta

    def accept_peer_meta(self, peer: PeerId, meta: bytes) -> str | None:
        try:
            pool = decode_pool(meta)
        except msgspec.MsgspecError:
            return "the peer sent no usable NIXL metadata (is it on --transfer-backend nixl?)"
        if pool.page_nbytes != self.page_nbytes:
            return f"NIXL page size differs: peer {pool.page_nbytes} B, here {self.page_nbytes} B"
        if pool.mem_type not in ("DRAM", "VRAM"):
            return f"unknown NIXL memory type {pool.mem_type!r}"
        if self.endpoint is not None:  # prefill: the peer reads from us, and notifies us
            self._peer_of_agent[pool.agent_name] = peer
            return None
        self._remove_later.discard(peer)  # the key now names the peer's new agent
        if self._peer_pools.get(peer) == pool:
            # The same agent again (a handshake repeated on a live connection, for a prefill
            # that forgot it): reloading it failed the reads of other rooms still running.
            return None
        try:
            self._agent.add_peer(peer, pool)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            return f"cannot load the NIXL metadata of {peer}: {exc}"
        self._peer_pools[peer] = pool
        return None

    # -- prefill side --------------------------------------------------------------------
    def send_kv(
        self,
        peer: PeerId,
        room: int,
        src_page_ids: list[int],
        dst_page_ids: list[int],
        then: m.RoomStatus,
    ) -> SendHandle:
        """Queued: the rooms of one step reach the peer as one message at the next poll."""
        self._check_open()
        src, dst = self._page_pairs(src_page_ids, dst_page_ids)
        copy = NixlCopy(
            room=room, src_page_ids=src.tolist(), dst_page_ids=dst.tolist(), status=then
        )
        self._batches.setdefault(peer, []).append(copy)
        handle = NixlSend(room, copy.src_page_ids, time.monotonic() + self.options.read_timeout_s)
        self._sends[(peer, room)] = handle
        self._stats["kv_bytes_out"] += src.size * self.page_nbytes
        return handle

    def _send_batches(self) -> None:
        batches, self._batches = self._batches, {}
        for peer, copies in batches.items():
            try:
                self._enqueue(peer, [Outgoing(parts=[_encoder.encode(NixlBatch(copies=copies))])])
            except TransportError:  # _enqueue lost the peer, which failed its sends
                continue

    def _expire_sends(self, now: float) -> None:
        for key in [k for k, h in self._sends.items() if now >= h.deadline]:
            reason = f"decode did not read the KV within {self.options.read_timeout_s:g}s"
            self._sends.pop(key).finish(reason)

    def _awaited_peers(self) -> set[PeerId]:
        return {peer for peer, _ in self._sends}

    def _take_notifications(self) -> None:
        for agent_name, msgs in self._agent.notifications().items():
            peer = self._peer_of_agent.get(agent_name)
            for msg in msgs:
                try:
                    handle = self._sends.pop((peer, int(msg)), None) if peer else None
                except ValueError:
                    handle = None
                if handle is None:
                    self._reject(PeerId(agent_name), "nixl_notification")
                else:
                    handle.finish()

    # -- both sides ----------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> list[Event]:
        self._send_batches()
        self._take_notifications()
        # Completions wake no socket: come back at once for reads, soon for notifications.
        reading = self._reads or self._settling
        wait_ms = 0 if reading else min(timeout_ms, 1) if self._sends else timeout_ms
        # Before the peers lost in this poll add reads: those are forgotten first.
        settled = self._finish_settling()
        events = super().poll(wait_ms)
        events += settled
        for event in events:
            if isinstance(event, PeerLost):
                self._drop_peer(event.peer, event.reason)
        self._finish_reads(events)
        self._take_notifications()
        self._expire_sends(time.monotonic())
        return events

    def forget_room(self, room: int) -> list[int]:
        super().forget_room(room)
        # Prefill: decode may still read a room it was told of; its pages wait for the end.
        held = forget_pulled_room(room, self._batches, self._sends, self._held)
        read = self._reads.pop(room, None)
        if read is not None:
            self._settle([read])
        settling = self._settling.get(room)
        return held + (list(settling.copy.dst_page_ids) if settling else [])

    def busy(self) -> bool:
        """Batches to send or reads to finish; not sends awaiting decode's read: decode
        drives those, and the worker loop polls while their rooms are transferring."""
        return super().busy() or bool(self._batches or self._reads or self._settling)

    def close(self) -> None:
        if self._closed:
            return
        for peer in {p for p, _ in self._sends} | {r.peer for r in self._reads.values()}:
            self._drop_peer(peer, "transport closed")
        self._batches.clear()
        self._agent.close()
        super().close()

    def _drop_peer(self, peer: PeerId, reason: str) -> None:
        for key in [k for k in self._sends if k[0] == peer]:
            self._sends.pop(key).finish(reason)
        self._settle(
            [self._reads.pop(r) for r, read in list(self._reads.items()) if read.peer == peer]
        )
        self._batches.pop(peer, None)
        if self._peer_pools.pop(peer, None) is not None:
            if any(r.peer == peer for r in self._settling.values()):
                self._remove_later.add(peer)  # its reads still run on the peer's agent
            else:
                self._agent.remove_peer(peer)
        for name in [n for n, p in self._peer_of_agent.items() if p == peer]:
            del self._peer_of_agent[name]

    def _lose(self, peer: PeerId, reason: str, quiet: bool = False) -> None:
        super()._lose(peer, reason, quiet)
        self._drop_peer(peer, reason)

    def connect(self, endpoint: str) -> PeerId:
        peer = super().connect(endpoint)
        self._disconnect_later.discard(peer)  # in use again
        return peer

    def disconnect(self, peer: PeerId) -> None:
        if peer in self._remove_later:
            self._disconnect_later.add(peer)
        else:
            super().disconnect(peer)

    def _on_message(self, peer: PeerId, parts: list[zmq.Frame], events: list[Event]) -> int:
        try:
            msg = _decoder.decode(parts[0].buffer) if len(parts) == 1 else None
        except msgspec.MsgspecError:
            msg = None
        if msg is None:
            return super()._on_message(peer, parts, events)
        self._stats["msgs_in"] += 1
        if isinstance(msg, NixlBatch):
            for copy in msg.copies:
                self._start_read(peer, copy, events)
            return 0
        for room in msg.rooms:
            handle = self._sends.pop((peer, room), None)
            if handle is not None:
                handle.finish(msg.error)
        return 0

    # -- decode side ---------------------------------------------------------------------
    def _start_read(self, peer: PeerId, copy: NixlCopy, events: list[Event]) -> None:
        reason, src, dst = self._check_copy(peer, copy)
        handle = None
        if reason is None and src.size:
            try:
                handle = self._agent.read(peer, self._peer_pools[peer], src, dst, b"%d" % copy.room)
            except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
                log.warning("NIXL read for room %d from %s failed: %s", copy.room, peer, exc)
                reason = "read"
        if reason is not None:
            self._give_up(peer, copy.room, f"refused: {reason}")
            self._reject(peer, "nixl_" + reason)
            self._fail_room(peer, copy.room, f"its copy was refused ({reason})", events)
            return
        if handle is None:
            self._tell(peer, NixlDone(rooms=[copy.room]))  # no pages: nothing to notify
        self._reads[copy.room] = Read(peer, copy, handle)

    def _check_copy(
        self, peer: PeerId, copy: NixlCopy
    ) -> tuple[str | None, np.ndarray, np.ndarray]:
        """(refusal reason or None, src ids, dst ids) of one room's copy."""
        empty = np.zeros(0, dtype=np.int64)
        header = m.KVHeader(
            room=copy.room,
            frame_page_counts=[],
            page_nbytes=self.page_nbytes,
            dst_page_ids=copy.dst_page_ids,
        )
        reason = self._grants.check(peer, header, [], self.page_nbytes, moves_bytes=False)
        src_pool = self._peer_pools.get(peer)
        if reason is None and src_pool is None:
            reason = "no_pool"
        if reason is None and copy.room in self._reads:
            reason = "duplicate"
        if reason is not None:
            return reason, empty, empty
        assert src_pool is not None
        try:
            src = page_array(copy.src_page_ids, src_pool.num_pages, "src_page_ids")
            dst = page_array(copy.dst_page_ids, self.num_pages, "dst_page_ids")
        except ValueError:
            return "page_ids", empty, empty
        if src.size != dst.size:
            return "page_count", empty, empty
        return None, src, dst

    def _finish_reads(self, events: list[Event]) -> None:
        """Rooms whose read ended: their pages (if it succeeded), then their status."""
        for room, read in list(self._reads.items()):
            state = "DONE" if read.handle is None else self._agent.state(read.handle)
            if state == "PROC":
                continue
            del self._reads[room]
            if read.handle is not None:
                self._agent.release(read.handle)
            grant = self._grants.get(room)
            if state == "DONE" and grant is not None and grant.peer == read.peer:
                nbytes = len(read.copy.dst_page_ids) * self.page_nbytes
                self._grants.record(room, read.copy.dst_page_ids, nbytes)
                self._stats["kv_bytes_in"] += nbytes
            elif state != "DONE":
                self._give_up(read.peer, room, "the NIXL read failed")
                self._reject(read.peer, "nixl_read_failed")
                self._fail_room(read.peer, room, "the NIXL read from prefill failed", events)
                continue
            self._on_control(read.peer, read.copy.status, events)

    def _settle(self, reads: list[Read]) -> None:
        """Reads of forgotten rooms: those that have not ended are left to end (a cancelled
        one was seen to land anyway once the peer resumed, over UCX's TCP emulation with
        NIXL 1.5.1), in `_settling`, their pages returned by `forget_room`."""
        for read in reads:
            if read.handle is not None and self._still_reading(read):
                self._settling[read.copy.room] = read

    def _finish_settling(self) -> list[Event]:
        """PagesSettled for the settling reads that ended; lost peers they held, removed."""
        events: list[Event] = []
        for room, read in list(self._settling.items()):
            if not self._still_reading(read):
                del self._settling[room]
                events.append(PagesSettled(list(read.copy.dst_page_ids)))
        busy_peers = {r.peer for r in self._settling.values()}
        for peer in self._remove_later - busy_peers:
            self._remove_later.discard(peer)
            self._agent.remove_peer(peer)
            if peer in self._disconnect_later:
                self._disconnect_later.discard(peer)
                super().disconnect(peer)
        return events

    def _still_reading(self, read: Read) -> bool:
        """True while the read is under way; once it has ended, releases its handle."""
        if self._agent.state(read.handle) == "PROC":
            return True
        self._agent.release(read.handle)
        return False

    def _fail_room(self, peer: PeerId, room: int, why: str, events: list[Event]) -> None:
        """The room's KV cannot arrive from `peer`: its status fails in place of prefill's
        (a 502: the prefill side, dead or sending pages outside the grant, caused it)."""
        error = f"KV of room {room} did not arrive: {why}"
        self._on_control(
            peer, m.RoomStatus(room=room, ok=False, error=error, error_status=502), events
        )

    def _give_up(self, peer: PeerId, room: int, error: str) -> None:
        self._tell(peer, NixlDone(rooms=[room], error=error))

    def _tell(self, peer: PeerId, msg: NixlDone) -> None:
        try:
            self._enqueue(peer, [Outgoing(parts=[_encoder.encode(msg)])])
        except TransportError as exc:  # the peer is gone: nothing to free on our side
            log.debug("NixlDone for rooms %s to %s not sent: %s", msg.rooms, peer, exc)
