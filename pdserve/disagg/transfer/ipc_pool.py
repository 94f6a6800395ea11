"""What the cuda_ipc KV transport sends (msgpack structs) and how a worker maps its peer's
KV pool by CUDA IPC. Used by cuda_ipc.py in prefill and decode worker processes."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import torch

from pdserve.disagg import messages as m


class IpcPool(msgspec.Struct, tag="ipc_pool", kw_only=True):
    """prefill -> decode, before its first IpcCopy: how to map the prefill pool."""

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


PAGE_ID = np.dtype("<i4")  # page ids on the wire: packed int32, no Python int per page


class IpcCopy(msgspec.Struct, kw_only=True):
    """Copy my pages `src_ids` into your `dst_ids` for `room`, then `status`. The ids are
    packed int32 arrays (`pack_ids`), read back with `unpack_ids`."""

    room: int
    src_ids: bytes
    dst_ids: bytes
    status: m.RoomStatus  # what a separate RoomStatus message would say after the KV


def pack_ids(ids: np.ndarray) -> bytes:
    return ids.astype(PAGE_ID, copy=False).tobytes()


def unpack_ids(data: bytes, num_pages: int, what: str) -> np.ndarray:
    """Packed page ids as an int32 array; ValueError unless whole, distinct and in range."""
    if len(data) % PAGE_ID.itemsize:
        raise ValueError(f"{what}: {len(data)} bytes is not a whole number of page ids")
    ids = np.frombuffer(data, dtype=PAGE_ID)
    if ids.size and (ids.min() < 0 or ids.max() >= num_pages):
        raise ValueError(f"{what} out of range for a pool of {num_pages} pages")
    if ids.size > 1 and np.unique(ids).size != ids.size:
        raise ValueError(f"{what} has duplicate page ids")
    return ids


class IpcBatch(msgspec.Struct, tag="ipc_batch", kw_only=True):
    """prefill -> decode: the rooms sent to this peer since the last poll, in order."""

    copies: list[IpcCopy]


class IpcCopyDone(msgspec.Struct, tag="ipc_done", kw_only=True):
    """decode -> prefill: the copies for `rooms` finished (or were refused): free the pages."""

    rooms: list[int]
    error: str | None = None


IpcMsg = IpcPool | IpcBatch | IpcCopyDone
_encoder = msgspec.msgpack.Encoder()
# One decode for both kinds: every tag is distinct, and a cuda_ipc peer sends both on its lane.
_decoder = msgspec.msgpack.Decoder(IpcMsg | m.ChannelMsg)


def encode(msg: IpcMsg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> IpcMsg | m.ChannelMsg:
    """Raises msgspec.MsgspecError on garbage; callers drop such messages."""
    return _decoder.decode(data)


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
