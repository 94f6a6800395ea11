"""What the cuda_ipc KV transport sends (msgpack structs) and how a prefill worker maps its
decode peer's KV pool by CUDA IPC. Used by cuda_ipc.py in prefill and decode worker
processes."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import torch

from pdserve.disagg import messages as m


class IpcPool(msgspec.Struct, kw_only=True):
    """How to map a KV pool by CUDA IPC (decode's, in IpcTarget)."""

    host_id: str  # CUDA IPC works within one host only
    device: int
    handle: bytes
    storage_nbytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    pool_offset_bytes: int  # where the pool starts inside the shared storage
    num_pages: int
    page_nbytes: int


PAGE_ID = np.dtype("<i4")  # page ids as the copy kernel reads them


class IpcTarget(msgspec.Struct, tag="ipc_target", kw_only=True):
    """decode -> prefill, before its first IpcGrant: where to write (the decode pool) and
    where to say that a grant landed (the completion slots, ipc_flags.py)."""

    pool: IpcPool
    slots_pid: int  # the slots are the memfd /proc/<slots_pid>/fd/<slots_fd>
    slots_fd: int
    num_slots: int
    payload_nbytes: int


class IpcGrant(msgspec.Struct, tag="ipc_grant", kw_only=True):
    """decode -> prefill: `page_list`, plus the completion slot that says when every write
    into its pages has landed: prefill sets it to `seq` after its copy (or at once, if it
    will not copy), and writes nothing into the pages once CLOCK_MONOTONIC (one clock on
    one host) passes `expires_at`."""

    page_list: m.PageList
    slot: int
    seq: int
    expires_at: float


class IpcStatus(msgspec.Struct, kw_only=True):
    """What a landed slot's payload holds: how many pages the copy wrote, and the room's
    status as the RoomStatus message of the other backends would say it (None: too long
    for the slot, it follows as that message)."""

    num_pages: int
    status: m.RoomStatus | None


class IpcLanded(msgspec.Struct, tag="ipc_landed", kw_only=True):
    """prefill -> decode, once per poll for the rooms whose copy it queued since the last:
    their slots will be set within a copy's time. Only a wake-up: a decode loop that polls
    anyway sees the slots without it."""

    rooms: list[int]


IpcMsg = IpcTarget | IpcGrant | IpcLanded
_encoder = msgspec.msgpack.Encoder()
# One decode for both kinds: every tag is distinct, and a cuda_ipc peer sends both on its lane.
_decoder = msgspec.msgpack.Decoder(IpcMsg | m.ChannelMsg)
_status_decoder = msgspec.msgpack.Decoder(IpcStatus)


def encode(msg: IpcMsg | IpcStatus) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> IpcMsg | m.ChannelMsg:
    """Raises msgspec.MsgspecError on garbage; callers drop such messages."""
    return _decoder.decode(data)


def decode_status(data: bytes) -> IpcStatus:
    """A landed slot's payload; raises msgspec.MsgspecError on garbage."""
    return _status_decoder.decode(data)


def host_id() -> str:
    """Same on every process of this boot of this machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return os.uname().nodename


def export_pool(pool: torch.Tensor, page_nbytes: int) -> IpcPool:
    storage = pool.untyped_storage()
    (device, handle, size, offset, rc_handle, rc_offset, event, sync) = storage._share_cuda_()
    return IpcPool(
        host_id=host_id(),
        device=int(device),
        handle=handle,
        storage_nbytes=int(size),
        storage_offset_bytes=int(offset),
        ref_counter_handle=rc_handle,
        ref_counter_offset=int(rc_offset),
        event_handle=event or b"",
        event_sync_required=bool(sync),
        pool_offset_bytes=pool.storage_offset() * pool.element_size(),
        num_pages=int(pool.shape[0]),
        page_nbytes=page_nbytes,
    )


def open_pool(msg: IpcPool) -> torch.Tensor:
    """The peer's pool as uint8 [num_pages, page_nbytes] on its device, mapped here."""
    if msg.host_id != host_id():
        raise ValueError("the peer is on another host: CUDA IPC needs one host")
    storage = torch.UntypedStorage._new_shared_cuda(
        msg.device,
        msg.handle,
        msg.storage_nbytes,
        msg.storage_offset_bytes,
        msg.ref_counter_handle,
        msg.ref_counter_offset,
        msg.event_handle or None,
        msg.event_sync_required,
    )
    flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{msg.device}")
    flat.set_(storage, msg.pool_offset_bytes, (msg.num_pages * msg.page_nbytes,), (1,))
    return flat.view(msg.num_pages, msg.page_nbytes)


def check_pool(pool: torch.Tensor) -> None:
    if pool.device.type != "cuda" or not pool.is_contiguous():
        raise ValueError("the cuda_ipc KV transport needs a contiguous CUDA pool")


def page_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the runs where both id lists count up by one."""
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return [(int(src[i]), int(dst[i]), int(n)) for i, n in zip(starts, lengths, strict=True)]
