"""KV transport for GPU pools on one host: pages move GPU to GPU through CUDA IPC, control
messages on a Unix datagram lane (ipc_lane.py). Runs in prefill and decode worker processes.

The decode side pulls: the prefill side shares its pool's IPC handle once per peer; rooms
sent between two polls go out as one `IpcBatch` message, each room an `IpcCopy(src pages,
dst pages, status)` with its page ids packed as int32 bytes. The decode side checks each
room's pages against its grant (exactly as the zmq backend checks frames), copies every
accepted room in one kernel on its own stream, and acks with one `IpcCopyDone(rooms)` once
the copy has finished, which frees the prefill side's pages. So no write ever lands in a
page the decode side did not grant, and KV bytes never pass through host memory or Python
per page.

Control messages skip ZeroMQ (lane_control.py): a message is one `sendmsg` into the peer's
lane, and the peer's loop wakes on the lane's descriptor, where a ZeroMQ hop adds two
I/O-thread hand-offs. The ZeroMQ connection stays up for its heartbeats.

Prefill's pages are complete when `send_kv` is called: the engine reads each step's logits
on the host, which waits for every kernel of that step. On the decode side, the copy is on
the stream the engine computes on, so its next step sees the pages without a sync.
"""

from __future__ import annotations

import logging

import msgspec
import numpy as np
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    AckedSend,
    Event,
    PeerId,
    PeerLost,
    SendHandle,
    TransportError,
    TransportOptions,
    forget_pulled_room,
)
from pdserve.disagg.transfer.fake_backend import FakeTransport
from pdserve.disagg.transfer.ipc_pool import (
    PAGE_ID,
    IpcBatch,
    IpcCopy,
    IpcCopyDone,
    IpcPool,
    check_pool,
    decode,
    encode,
    export_pool,
    open_pool,
    pack_ids,
    page_runs,
    unpack_ids,
)
from pdserve.disagg.transfer.lane_control import LaneControl
from pdserve.disagg.transfer.zmq.outbox import Outgoing

log = logging.getLogger(__name__)


class IpcSend(AckedSend):
    """One send_kv: done when the peer acks the copy, or the peer is lost."""

    def __init__(self, room: int, peer: PeerId, page_ids: list[int]) -> None:
        super().__init__(room, page_ids)
        self.peer = peer


class CudaIpcTransport(LaneControl, FakeTransport):
    """The fake backend's control flow (grants, RoomStatus, KVReceived) with IpcCopy in place
    of its byte-less KVHeader. The base class sees a one-byte-per-page shadow pool."""

    name = "cuda_ipc"

    def __init__(
        self,
        pool: torch.Tensor,
        *,
        listen_host: str | None = None,
        advertise_host: str | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        check_pool(pool)
        shadow = torch.zeros(pool.shape[0], 1, dtype=torch.uint8)
        super().__init__(
            shadow, listen_host=listen_host, advertise_host=advertise_host, options=options
        )
        self.pool = pool
        self.page_nbytes = pool[0].numel() * pool.element_size()
        self._pages = pool.view(torch.uint8).view(self.num_pages, self.page_nbytes)
        self._exported: IpcPool | None = None
        self._told: set[str] = set()  # peers that have our IpcPool
        self._peer_pools: dict[str, torch.Tensor] = {}  # uint8 [num_pages, page_nbytes]
        self._words = _as_words(self._pages)  # what the copy kernel moves
        self._peer_words: dict[str, torch.Tensor] = {}
        self._sends: dict[tuple[str, int], IpcSend] = {}
        self._batches: dict[PeerId, list[IpcCopy]] = {}  # sent at the next poll
        self._acks: list[tuple[PeerId, list[int], torch.cuda.Event]] = []

    def peer_pool(self, peer: PeerId) -> torch.Tensor | None:
        """The peer's pool as mapped here (uint8 [num_pages, page_nbytes]), once it came."""
        return self._peer_pools.get(peer)

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
        copy = IpcCopy(room=room, src_ids=pack_ids(src), dst_ids=pack_ids(dst), status=then)
        self._batches.setdefault(peer, []).append(copy)
        handle = IpcSend(room, peer, src.tolist())
        self._sends[(peer, room)] = handle
        self._stats["kv_bytes_out"] += src.size * self.page_nbytes
        return handle

    def _send_batches(self) -> None:
        batches, self._batches = self._batches, {}
        for peer, copies in batches.items():
            parts: list[bytes] = []
            if peer not in self._told:
                if self._exported is None:
                    self._exported = export_pool(self.pool, self.page_nbytes)
                parts.append(encode(self._exported))
            parts.append(encode(IpcBatch(copies=copies)))
            try:
                self._enqueue(peer, [Outgoing(parts=[p]) for p in parts])
            except TransportError:  # _enqueue lost the peer, which failed its sends
                continue
            self._told.add(peer)

    def _awaited_peers(self) -> set[PeerId]:
        return {PeerId(peer) for peer, _ in self._sends}

    # -- both sides ----------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> list[Event]:
        # Acks for copies that finished go out first, so that a KVReceived found now is
        # handed to the caller without waiting behind them.
        self._send_batches()
        self._send_acks()
        events = super().poll(0 if self._acks else timeout_ms)
        for event in events:
            if isinstance(event, PeerLost):
                self._drop_peer(event.peer, event.reason)
        return events

    def forget_room(self, room: int) -> list[int]:
        super().forget_room(room)
        # Prefill: decode may still copy from a room it was told of until it acks.
        return forget_pulled_room(room, self._batches, self._sends, self._held)

    def busy(self) -> bool:
        """Batches or acks still to go out; not sends awaiting decode's ack (as NIXL's reads):
        decode copies on its own, the pages stay held until the ack, and the worker loop
        polls while their rooms are transferring, so prefill need not hold its next forward
        pass for an ack (`PrefillWorkerHooks._finish_sends_first`)."""
        return super().busy() or bool(self._acks or self._batches)

    def close(self) -> None:
        for peer in {p for p, _ in self._sends} | set(self._peer_pools):
            self._drop_peer(PeerId(peer), "transport closed")
        self._acks.clear()
        self._batches.clear()
        super().close()

    def _drop_peer(self, peer: PeerId, reason: str) -> None:
        for key in [k for k in self._sends if k[0] == peer]:
            self._sends.pop(key).finish(reason)
        self._peer_pools.pop(peer, None)
        self._peer_words.pop(peer, None)
        self._told.discard(peer)
        self._batches.pop(peer, None)
        self._acks = [a for a in self._acks if a[0] != peer]

    def _lose(self, peer: PeerId, reason: str) -> None:
        super()._lose(peer, reason)
        self._drop_peer(peer, reason)

    def _on_message(self, peer: PeerId, parts: list[zmq.Frame], events: list[Event]) -> int:
        """One message, from the lane or the ZeroMQ socket; returns the KV bytes it queued."""
        self._stats["msgs_in"] += 1
        if len(parts) != 1:
            return self._reject(peer, "extra_frames")
        try:
            msg = decode(parts[0].buffer)
        except msgspec.MsgspecError:
            return self._on_data_message(peer, parts)  # a DataProbe, or garbage
        if isinstance(msg, IpcPool):
            return self._on_pool(peer, msg)
        if isinstance(msg, IpcBatch):
            return self._on_batch(peer, msg, events)
        if isinstance(msg, IpcCopyDone):
            for room in msg.rooms:
                handle = self._sends.pop((peer, room), None)
                if handle is not None:
                    handle.finish(msg.error)
            return 0
        if isinstance(msg, m.KVHeader):  # KV only ever comes as IpcCopy here
            return self._reject(peer, "kv_header")
        self._on_control(peer, msg, events)
        return 0

    # -- decode side ---------------------------------------------------------------------
    def _on_pool(self, peer: PeerId, msg: IpcPool) -> int:
        if msg.page_nbytes != self.page_nbytes:
            return self._reject(peer, "ipc_page_nbytes")
        try:
            self._peer_pools[peer] = open_pool(msg)
            self._peer_words[peer] = _as_words(self._peer_pools[peer])
        except (RuntimeError, ValueError) as exc:
            log.warning("cannot map the KV pool of %s: %s", peer, exc)
            return self._reject(peer, "ipc_open")
        return 0

    def _on_batch(self, peer: PeerId, batch: IpcBatch, events: list[Event]) -> int:
        """Check every room against its grant, copy the accepted ones in one launch, then
        act on each room's status in order (KVReceived once its pages are queued)."""
        src_pool = self._peer_pools.get(peer)
        accepted: list[tuple[IpcCopy, np.ndarray, np.ndarray]] = []
        for copy in batch.copies:
            reason, src, dst = self._check_copy(peer, src_pool, copy)
            if reason is None:
                accepted.append((copy, src, dst))
            else:
                done = IpcCopyDone(rooms=[copy.room], error=f"refused: {reason}")
                self._enqueue_ack(peer, done)
                self._reject(peer, "ipc_" + reason)
        nbytes = 0
        if accepted:
            assert src_pool is not None
            self._copy(
                peer,
                np.concatenate([src for _, src, _ in accepted]),
                np.concatenate([dst for _, _, dst in accepted]),
            )
            event = torch.cuda.Event()
            event.record()
            self._acks.append((peer, [copy.room for copy, _, _ in accepted], event))
            for copy, _, dst in accepted:
                room_nbytes = dst.size * self.page_nbytes
                self._grants.record(copy.room, dst.tolist(), room_nbytes)
                nbytes += room_nbytes
            self._stats["kv_bytes_in"] += nbytes
        for copy in batch.copies:
            self._on_control(peer, copy.status, events)
        return nbytes

    def _check_copy(
        self, peer: PeerId, src_pool: torch.Tensor | None, copy: IpcCopy
    ) -> tuple[str | None, np.ndarray, np.ndarray]:
        """(refusal reason or None, src ids, dst ids) of one room's copy."""
        empty = np.zeros(0, dtype=PAGE_ID)
        try:
            dst = unpack_ids(copy.dst_ids, self.num_pages, "dst_ids")
        except ValueError:
            return "page_ids", empty, empty
        header = m.KVHeader(
            room=copy.room,
            frame_page_counts=[],
            page_nbytes=self.page_nbytes,
            dst_page_ids=dst.tolist(),
        )
        reason = self._grants.check(peer, header, [], self.page_nbytes, moves_bytes=False)
        if reason is None and src_pool is None:
            reason = "no_pool"
        if reason is not None:
            return reason, empty, empty
        assert src_pool is not None
        try:
            src = unpack_ids(copy.src_ids, src_pool.shape[0], "src_ids")
        except ValueError:
            return "page_ids", empty, empty
        if src.size != dst.size:
            return "page_count", empty, empty
        return None, src, dst

    def _copy(self, peer: PeerId, src: np.ndarray, dst: np.ndarray) -> None:
        """Queue the page copy on the current stream (ids already checked)."""
        if src.size == 0:
            return
        src_pool = self._peer_pools[peer]
        if src_pool.device == self._pages.device:
            from pdserve.engine.gpu.copy_pages import copy_pages  # Triton, imported on use

            # One upload of both id lists. Non-blocking from pageable memory: the driver
            # stages the few bytes at once, with no wait behind the work queued on the stream.
            ids = torch.from_numpy(np.stack([src, dst])).to(self._pages.device, non_blocking=True)
            copy_pages(self._peer_words[peer], self._words, ids)
        else:  # the peer's pool is on another GPU: one copy_ per run of consecutive pages
            for s, d, n in page_runs(src, dst):
                self._pages[d : d + n].copy_(src_pool[s : s + n], non_blocking=True)

    def _send_acks(self) -> None:
        pending = []
        for peer, rooms, event in self._acks:
            if event.query():
                self._enqueue_ack(peer, IpcCopyDone(rooms=rooms))
            else:
                pending.append((peer, rooms, event))
        self._acks = pending

    def _enqueue_ack(self, peer: PeerId, msg: IpcCopyDone) -> None:
        try:
            self._enqueue(peer, [Outgoing(parts=[encode(msg)])])
        except TransportError as exc:  # the peer is gone: nothing to free on our side
            log.debug("ack for rooms %s to %s not sent: %s", msg.rooms, peer, exc)


def _as_words(pages: torch.Tensor) -> torch.Tensor:
    """A uint8 pool [num_pages, page_nbytes] as int64 words where pages are whole words: the
    copy kernel moves 8 bytes per load (computed once per pool, not per copy)."""
    return pages.view(torch.int64) if pages.shape[1] % 8 == 0 else pages
