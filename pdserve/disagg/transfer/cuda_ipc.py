"""KV transport for GPU pools on one host: the prefill side writes the pages straight into
the decode pool by CUDA IPC, and says so through host memory both share (ipc_flags.py), not
a message. Control messages go on a Unix datagram lane (ipc_lane.py). Runs in prefill and
decode worker processes.

The decode side pushes a grant: before its first page list to a prefill peer it sends an
`IpcTarget` (its pool's IPC handle, its completion slots); each page list goes as an
`IpcGrant` with a slot and a sequence number. On `send_kv` the prefill side checks the
destination pages against the grant, writes the room's status into the slot's payload,
queues one page-copy kernel into the decode pool and then the slot's flag := the sequence
number, both on the stream its engine computes on (so after the step that made the KV),
and returns. The decode loop reads every slot in one numpy comparison per poll: a set flag
says the bytes are in its pool, and its payload carries the status, so neither side runs
Python per page and no message is on that path. One `IpcLanded` per poll still goes out,
to wake a decode loop that sleeps.

Guarantees. Prefill writes only pages of a grant it holds, and holds none after the grant's
status, an Abort either way, a redirect, or its `expires_at`. Every grant ends with its
flag set: by the GPU after the copy, or by the host when prefill will not copy (then a
message, or an error status in the payload, says why). So decode reuses a forgotten room's
pages only once its flag is set, or its peer's process is gone, or the grant expired.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import msgspec
import numpy as np
import torch
import zmq

from pdserve import envs
from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import (
    Event,
    PeerId,
    SendHandle,
    TransportError,
    TransportOptions,
)
from pdserve.disagg.transfer.fake_backend import FakeTransport
from pdserve.disagg.transfer.ipc_flags import STATUS_PREFIX, SlotBoard, SlotsFull, SlotWriter
from pdserve.disagg.transfer.ipc_grants import (
    Copiers,
    Grant,
    IdRing,
    Target,
    TargetGpu,
    as_words,
    refusal,
    send_pairs,
    set_host,
)
from pdserve.disagg.transfer.ipc_landing import Landings
from pdserve.disagg.transfer.ipc_lane import lane_address, lane_bound
from pdserve.disagg.transfer.ipc_pool import (
    IpcGrant,
    IpcLanded,
    IpcStatus,
    IpcTarget,
    check_pool,
    decode,
    encode,
    export_pool,
    open_pool,
    page_runs,
)
from pdserve.disagg.transfer.lane_control import LaneControl
from pdserve.disagg.transfer.zmq.outbox import Outgoing
from pdserve.disagg.transfer.zmq.pages import page_array
from pdserve.engine.gpu.stream_ops import StreamWriter, current_stream_handle, device_pointer

log = logging.getLogger(__name__)

_ENDS_GRANT = (m.RoomStatus, m.Abort, m.Redirect)  # prefill sends these only for rooms it drops
INSTANCE_NBYTES = 16  # a transport's random instance id, in its handshake


class IpcSend(SendHandle):
    """One send_kv: done once its copy has run (the grant's slot reached its sequence
    number: the flag is set after the copy), or at once if nothing was queued."""

    def __init__(
        self, room: int, page_ids: list[int], copied: Callable[[], bool] | None, error: str | None
    ) -> None:
        self.room, self.page_ids = room, page_ids
        self._copied, self._error = copied, error

    def done(self) -> bool:
        return self._copied is None or self._copied()

    @property
    def error(self) -> str | None:
        return self._error


class CudaIpcTransport(LaneControl, FakeTransport):
    """The fake backend's connections, handshake and control messages, with the pages and
    their status moved as above. The base class sees a one-byte-per-page shadow pool."""

    name = "cuda_ipc"
    # Copies launch through the compiled kernel's launcher, flags are set by a stream write
    # (PDSERVE_CUDA_IPC_DIRECT_LAUNCH=0: Triton's JIT and a fill kernel, as gpu_transfer_bench's
    # baseline does per process).
    direct_launch = envs.cuda_ipc_direct_launch()

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
        self._words = as_words(pool.view(torch.uint8).view(self.num_pages, self.page_nbytes))
        # prefill side
        self._targets: dict[PeerId, Target] = {}
        self._retired: list[Target] = []  # lost peers' mappings: closed with the transport
        self._grants_in: dict[tuple[PeerId, int], Grant] = {}
        self._sends: dict[int, IpcSend] = {}  # copies queued, until they ran
        self._flag_writer = StreamWriter(enabled=self.direct_launch)
        self._wakes: dict[PeerId, list[int]] = {}
        # decode side
        self._landings: Landings | None = None  # made at the first grant
        self._target_msg: bytes | None = None  # IpcTarget, the same for every peer
        self._target_told: set[PeerId] = set()
        self._lost: set[PeerId] = set()  # peers ZeroMQ lost (without a lane, how one is gone)
        # Which process a peer is (its handshake's instance id): one that restarted at the
        # same address is another instance, and the grants of the one before are dead.
        self._instance = os.urandom(INSTANCE_NBYTES)
        self._peer_instances: dict[PeerId, bytes] = {}

    # -- decode side: grants --------------------------------------------------------------
    def send(self, peer: PeerId, msg: m.ChannelMsg) -> None:
        self._check_open()
        if isinstance(msg, m.PageList):
            return self._grant(peer, msg)
        if isinstance(msg, _ENDS_GRANT):
            self._end_grant(peer, msg.room)
        if isinstance(msg, m.Abort) and self._landings is not None:
            self._landings.forget_announced(msg.room)
        super().send(peer, msg)

    def _grant(self, peer: PeerId, page_list: m.PageList) -> None:
        page_array(page_list.dst_page_ids, self.num_pages, "PageList.dst_page_ids")
        landings = self._landing()
        items = []
        if peer not in self._target_told:
            if self._target_msg is None:
                self._target_msg = encode(self._target(landings.board))
            items.append(Outgoing(parts=[self._target_msg]))
        try:
            grant = landings.grant(page_list, self.options.grant_ttl_s)
        except SlotsFull as exc:
            raise TransportError(str(exc)) from exc
        items.append(Outgoing(parts=[encode(grant)]))
        try:
            self._enqueue(peer, items)
        except TransportError:
            landings.cancel(grant)  # nothing reached the peer
            raise
        self._target_told.add(peer)
        landings.commit(peer, grant, self._peer_instances.get(peer))

    def _landing(self) -> Landings:
        if self._landings is None:
            board = SlotBoard(self.options.ipc_slots, self.options.ipc_status_nbytes)
            self._landings = Landings(board, self.page_nbytes, self._reject, self._stats)
        return self._landings

    def _target(self, board: SlotBoard) -> IpcTarget:
        pid, fd = board.where
        return IpcTarget(
            pool=export_pool(self.pool, self.page_nbytes),
            slots_pid=pid,
            slots_fd=fd,
            num_slots=board.num_slots,
            payload_nbytes=board.payload_nbytes,
        )

    # -- both sides -------------------------------------------------------------------------
    def handshake_meta(self) -> bytes:
        return self._instance

    def accept_peer_meta(self, peer: PeerId, meta: bytes) -> str | None:
        if len(meta) not in (0, INSTANCE_NBYTES):  # 0: a peer that sends none
            return f"cuda_ipc handshake: {len(meta)} bytes of transfer metadata, not an instance id"
        if meta:
            self._peer_instances[peer] = bytes(meta)
        return None

    def poll(self, timeout_ms: int = 0) -> list[Event]:
        self._send_wakes()
        landings = self._landings
        events = self._collect()
        if not events and timeout_ms > 0 and landings is not None and landings.copies_in_flight:
            events = landings.await_announced(timeout_ms / 1000)  # their copies are running
        events += super().poll(0 if events else timeout_ms)
        events += self._collect()
        if landings is not None:
            events += landings.settle(self._peer_gone)
        for room in [r for r, s in self._sends.items() if s.done()]:
            del self._sends[room]
        return events

    def _collect(self) -> list[Event]:
        return self._landings.collect() if self._landings is not None else []

    def _spin_found(self, events: list[Event]) -> bool:
        """The lane spin (`lane_spin_us`) also watches the completion slots."""
        found = self._collect()
        events += found
        return bool(found)

    def forget_room(self, room: int) -> list[int]:
        super().forget_room(room)
        held = self._landings.forget(room) if self._landings is not None else []
        for peer in [p for p, r in self._grants_in if r == room]:
            self._end_grant(peer, room)
        send = self._sends.pop(room, None)
        if send is not None and not send.done():  # prefill: the copy still reads these
            held += self._held.hold(send.page_ids, send.done)
        return held

    def busy(self) -> bool:
        """Wake-ups still to go out (prefill), or copies announced whose slot is not set yet
        (decode: they land within a copy's time). Prefill's queued copies finish on their
        own: `IpcSend.done` needs no poll."""
        in_flight = self._landings is not None and self._landings.copies_in_flight
        return super().busy() or bool(self._wakes) or in_flight

    def close(self) -> None:
        if not self._closed and (self._targets or self._retired):
            torch.cuda.synchronize(self.pool.device)  # no copy still writes a mapped slot
        for target in [*self._targets.values(), *self._retired]:
            target.slots.close()
        self._targets.clear()
        self._retired.clear()
        self._wakes.clear()
        super().close()
        if self._landings is not None:
            self._landings.close()
            self._landings = None

    def _lose(self, peer: PeerId, reason: str, quiet: bool = False) -> None:
        super()._lose(peer, reason, quiet)
        self._lost.add(peer)
        self._target_told.discard(peer)
        self._wakes.pop(peer, None)
        for key in [k for k in self._grants_in if k[0] == peer]:
            del self._grants_in[key]
        target = self._targets.pop(peer, None)
        if target is not None:
            self._retired.append(target)  # a queued copy may still set one of its flags

    def _on_message(self, peer: PeerId, parts: list[zmq.Frame], events: list[Event]) -> int:
        """One message, from the lane or the ZeroMQ socket."""
        self._stats["msgs_in"] += 1
        if len(parts) != 1:
            return self._reject(peer, "extra_frames")
        try:
            msg = decode(parts[0].buffer)
        except msgspec.MsgspecError:
            return self._on_data_message(peer, parts)  # a DataProbe, or garbage
        if isinstance(msg, IpcTarget):
            return self._on_target(peer, msg)
        if isinstance(msg, IpcGrant):
            return self._on_grant(peer, msg, events)
        if isinstance(msg, IpcLanded):
            if self._landings is not None:
                self._landings.announce(msg.rooms)
            return 0
        if isinstance(msg, m.KVHeader):  # KV never comes as bytes here
            return self._reject(peer, "kv_header")
        if isinstance(msg, m.Abort):
            self._end_grant(peer, msg.room)  # prefill: decode gave up on the room
        if isinstance(msg, m.RoomStatus) and self._landings is not None:
            landed = self._landings.on_status(peer, msg)
            if landed is not None:  # a status too long for its slot
                events += landed
                return 0
        self._on_control(peer, msg, events)
        return 0

    # -- prefill side -----------------------------------------------------------------------
    def _on_target(self, peer: PeerId, msg: IpcTarget) -> int:
        if msg.pool.page_nbytes != self.page_nbytes:
            return self._reject(peer, "ipc_page_nbytes")
        try:
            pool = open_pool(msg.pool)
            slots = SlotWriter(msg.slots_pid, msg.slots_fd, msg.num_slots, msg.payload_nbytes)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("cannot map the KV pool or completion slots of %s: %s", peer, exc)
            return self._reject(peer, "ipc_open")
        old = self._targets.pop(peer, None)
        if old is not None:
            self._retired.append(old)
        self._targets[peer] = Target(as_words(pool), slots, None)
        return 0

    def _on_grant(self, peer: PeerId, msg: IpcGrant, events: list[Event]) -> int:
        target = self._targets.get(peer)
        room = msg.page_list.room
        reason = None
        if target is None:
            reason = "prefill could not map decode's KV pool and completion slots (see its log)"
        elif not 0 <= msg.slot < target.slots.num_slots:
            reason = "completion slot out of range"
        else:
            try:
                dst = page_array(msg.page_list.dst_page_ids, target.words.shape[0], "dst")
            except ValueError as exc:
                reason = str(exc)
            else:
                self._end_grant(peer, room)  # a page list sent again replaces the first
                self._grants_in[(peer, room)] = Grant(
                    msg.slot, msg.seq, dst, msg.expires_at, msg.page_list.dst_page_ids
                )
        if reason is not None:  # no write can come: decode fails the room now, not at its deadline
            self._reject(peer, "ipc_grant")
            failed = m.RoomStatus(room=room, ok=False, error=reason, error_status=503)
            try:
                self._enqueue(peer, [Outgoing(parts=[m.encode(failed)])])
            except TransportError:  # lost: its rooms fail on their own
                pass
        self._on_control(peer, msg.page_list, events)  # send_kv finds no grant: refused
        return 0

    def send_kv(
        self,
        peer: PeerId,
        room: int,
        src_page_ids: list[int],
        dst_page_ids: list[int],
        then: m.RoomStatus,
    ) -> SendHandle:
        """Queue the copy into the decode pool and its slot's flag on this stream; returns
        at once. A send the grant does not allow is refused (its slot says why)."""
        self._check_open()
        granted = self._grants_in.get((peer, room))
        src, dst = send_pairs(granted, src_page_ids, dst_page_ids, self.num_pages)
        grant = self._grants_in.pop((peer, room), None)
        target = self._targets.get(peer)
        reason = refusal(grant, target, dst, dst_page_ids)
        if reason is not None:
            if grant is not None and target is not None:
                error = m.RoomStatus(room=room, ok=False, error=reason, error_status=503)
                set_host(target, grant, IpcStatus(num_pages=0, status=error))
            return IpcSend(room, [], None, reason)
        assert grant is not None and target is not None
        num_pages = int(src.size)
        status = encode(IpcStatus(num_pages=num_pages, status=then))
        if not target.slots.write_status(grant.slot, status):
            status = encode(IpcStatus(num_pages=num_pages, status=None))
            assert target.slots.write_status(grant.slot, status), "ipc_status_nbytes >= 64"
            self._enqueue(peer, [Outgoing(parts=[m.encode(then)])])  # too long for the slot
        copied = None
        if src.size:
            copied = functools.partial(target.slots.passed, grant.slot, grant.seq)
            self._copy(target, src, dst, grant, STATUS_PREFIX + len(status), copied)
        else:
            target.slots.set_flag(grant.slot, grant.seq)
        # The pages as a list for forget_room (a copy of the caller's: 1 against 7 us at 512)
        held = list(src_page_ids) if isinstance(src_page_ids, list) else src.tolist()
        handle = IpcSend(room, held, copied, None)
        if copied is not None:
            self._sends[room] = handle
        self._wakes.setdefault(peer, []).append(room)
        self._stats["kv_bytes_out"] += src.size * self.page_nbytes
        return handle

    def _copy(
        self,
        target: Target,
        src: np.ndarray,
        dst: np.ndarray,
        grant: Grant,
        used: int,
        copied: Callable[[], bool],
    ) -> None:
        """Queue the copy, then the slot's flag, on the current stream. The page ids go in
        the slot's payload past its `used` bytes, where the kernel reads them in place (no
        upload), or, where they do not fit there, in the peer's id ring."""
        gpu = target.gpu if target.gpu is not None else self._map_gpu(target)
        stream = current_stream_handle(self.pool.device)
        if gpu.copy is not None:
            at = target.slots.write_ids(grant.slot, used, src, dst)
            if at is not None:
                gpu.copy.in_slots(at, int(src.size), stream)
            else:
                gpu.copy.long(src, dst, copied, stream)
        else:  # the peer's pool is on another GPU: one copy_ per run of consecutive pages
            for s, d, n in page_runs(src, dst):
                target.words[d : d + n].copy_(self._words[s : s + n], non_blocking=True)
        if not self._flag_writer.write(stream, gpu.flag_address(grant.slot), grant.seq):
            gpu.flags[grant.slot : grant.slot + 1].fill_(grant.seq)

    def _map_gpu(self, target: Target) -> TargetGpu:
        """The peer's slots registered with CUDA, and its page copier (at its first copy)."""
        flags, slot_words = target.slots.device_views(self.pool.device)
        copiers = None
        if target.words.device == self._words.device:
            from pdserve.engine.gpu.copy_pages import PageCopier  # Triton, imported on use

            src, dst, direct = self._words, target.words, self.direct_launch
            ids = torch.empty(2 * dst.shape[0], dtype=torch.int32, device=dst.device)
            # Room for the ids of two copies of the peer's whole pool, pinned: the GPU reads
            # it in place (the ring's numpy view keeps it alive as long as the target)
            ring = torch.empty(4 * dst.shape[0], dtype=torch.int32, pin_memory=True)
            copiers = Copiers(
                PageCopier(src, dst, slot_words, direct),
                PageCopier(src, dst, ring, direct),
                IdRing(ring.numpy()),
                PageCopier(src, dst, ids, direct),
                ids,
            )
        target.gpu = TargetGpu(flags, slot_words, copiers, device_pointer(flags.data_ptr()))
        return target.gpu

    def _end_grant(self, peer: PeerId, room: int) -> None:
        """Prefill will not write the room's pages: set its slot from the host, no status."""
        grant = self._grants_in.pop((peer, room), None)
        target = self._targets.get(peer)
        if grant is not None and target is not None:
            set_host(target, grant, None)

    def _send_wakes(self) -> None:
        wakes, self._wakes = self._wakes, {}
        for peer, rooms in wakes.items():
            try:
                self._enqueue(peer, [Outgoing(parts=[encode(IpcLanded(rooms=rooms))])])
            except TransportError:  # lost: the peer's rooms fail on their own
                continue

    def _peer_gone(self, peer: PeerId, instance: bytes | None) -> bool:
        """The peer process `instance` has exited: another instance has handshaken from its
        address since, or its lane is unbound; without a lane, ZeroMQ lost it."""
        current = self._peer_instances.get(peer)
        if instance is not None and current is not None and current != instance:
            return True
        if self._lane is not None:
            return not lane_bound(lane_address(peer))
        return peer in self._lost
