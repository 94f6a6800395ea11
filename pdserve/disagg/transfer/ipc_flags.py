"""Completion slots of the cuda_ipc KV transport: host memory shared by a decode worker and
its prefill peers, where a prefill worker's GPU marks a room's KV as landed in the decode
pool, with no message on that path. Runs in prefill and decode worker processes.

The decode side owns a memfd of `num_slots` slots: an int64 flag each, then a payload area
each (the room's final status). It gives every grant a free slot and a sequence number it
never reuses. The prefill side maps the same memory (through /proc/<pid>/fd), writes the
status into the slot's payload from the host, and the slot's flag := sequence number after
the copy, on its GPU stream (the mapping is registered with CUDA) or from the host when no
copy is queued. A flag equal to the grant's sequence number therefore says: every write of
that grant has landed, and none will follow. The decode side reads all flags in one numpy
comparison per poll.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

FLAG = np.dtype("<i8")
NO_FLAG = -1
_UNAWAITED = -2  # what a free slot expects: no flag is ever set to it by this protocol
_LENGTH = struct.Struct("<i")  # payload prefix: status bytes that follow (0: none)
STATUS_PREFIX = _LENGTH.size


class SlotsFull(Exception):
    """Every slot waits for a grant's flag: no grant can be made until one lands."""


def _layout(num_slots: int, payload_nbytes: int) -> tuple[int, int]:
    """(bytes of the flag array rounded to a page, total bytes)."""
    flags_nbytes = -(-num_slots * FLAG.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
    return flags_nbytes, flags_nbytes + num_slots * payload_nbytes


class _Mapping:
    """Flags [num_slots] int64, then payloads of payload_nbytes each, over one mapping."""

    def __init__(self, fd: int, num_slots: int, payload_nbytes: int) -> None:
        self.num_slots, self.payload_nbytes = num_slots, payload_nbytes
        flags_nbytes, total = _layout(num_slots, payload_nbytes)
        self.mmap = mmap.mmap(fd, total)
        buf = np.frombuffer(self.mmap, dtype=np.uint8)
        self.flags = buf[: num_slots * FLAG.itemsize].view(FLAG)
        self.words = buf[: total - total % 4].view("<i4")  # the whole mapping as int32
        self.address = buf.ctypes.data
        self.flags_nbytes, self.nbytes = flags_nbytes, total

    def payload_at(self, slot: int) -> int:
        """Where the slot's payload starts, in bytes from the mapping's start."""
        return self.flags_nbytes + slot * self.payload_nbytes

    def close(self) -> None:
        # the views must go before the mapping
        self.flags = self.words = np.zeros(0)
        try:
            self.mmap.close()
        except BufferError:  # a view still exported (a device tensor): the OS frees it at exit
            pass


class SlotBoard:
    """Decode side: owns the slots, hands them to grants, reports which grants landed."""

    def __init__(self, num_slots: int, payload_nbytes: int) -> None:
        self._fd = os.memfd_create("pdserve-kv-slots", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, _layout(num_slots, payload_nbytes)[1])
        self._map = _Mapping(self._fd, num_slots, payload_nbytes)
        self._map.flags[:] = NO_FLAG
        self._expected = np.full(num_slots, _UNAWAITED, dtype=FLAG)  # awaited sequence numbers
        self._free = list(range(num_slots - 1, -1, -1))
        self._next_seq = 0

    @property
    def where(self) -> tuple[int, int]:
        """(pid, fd) through which a peer on this host maps the slots."""
        return os.getpid(), self._fd

    @property
    def num_slots(self) -> int:
        return self._map.num_slots

    @property
    def payload_nbytes(self) -> int:
        return self._map.payload_nbytes

    def take(self) -> tuple[int, int]:
        """(slot, sequence number) for a new grant; SlotsFull if none is free."""
        if not self._free:
            raise SlotsFull(f"all {self.num_slots} KV completion slots wait for a transfer")
        slot = self._free.pop()
        self._next_seq += 1
        self._expected[slot] = self._next_seq
        return slot, self._next_seq

    def landed(self) -> np.ndarray:
        """Slots whose awaited flag is set: one vectorised comparison (a decode loop spinning
        on the slots calls this every few microseconds)."""
        return (self._map.flags == self._expected).nonzero()[0]

    def is_landed(self, slot: int) -> bool:
        expected = self._expected[slot]
        return expected != _UNAWAITED and self._map.flags[slot] == expected

    def status_bytes(self, slot: int) -> bytes | None:
        """What a landed slot's payload holds (None: nothing)."""
        at = self._map.payload_at(slot)
        (n,) = _LENGTH.unpack_from(self._map.mmap, at)
        if n <= 0 or n > self._map.payload_nbytes - _LENGTH.size:
            return None
        return self._map.mmap[at + _LENGTH.size : at + _LENGTH.size + n]

    def release(self, slot: int) -> None:
        """The slot's grant is over (landed, or its peer can write no more): reuse it."""
        self._expected[slot] = _UNAWAITED
        self._free.append(slot)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class SlotWriter:
    """Prefill side: one decode peer's slots, mapped here. `device_views()` gives CUDA views
    for the flag writes and page-id reads of kernels queued on a stream (GPU only)."""

    def __init__(self, pid: int, fd: int, num_slots: int, payload_nbytes: int) -> None:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            if os.fstat(own).st_size < _layout(num_slots, payload_nbytes)[1]:
                raise ValueError("the peer's KV completion slots are smaller than announced")
            self._map = _Mapping(own, num_slots, payload_nbytes)
        finally:
            os.close(own)
        self._registered = False

    @property
    def num_slots(self) -> int:
        return self._map.num_slots

    # Both writes go to the mapping directly, not through a payload row's numpy view: they
    # are on every send_kv's path, and the view costs about a microsecond each.
    def write_status(self, slot: int, data: bytes | None) -> bool:
        """Put `data` (None: nothing) in the slot's payload; False, writing nothing, if it
        does not fit."""
        size = 0 if data is None else len(data)
        if size > self._map.payload_nbytes - _LENGTH.size:
            return False
        at = self._map.payload_at(slot)
        if data:
            self._map.mmap[at + _LENGTH.size : at + _LENGTH.size + size] = data
        _LENGTH.pack_into(self._map.mmap, at, size)
        return True

    def write_ids(
        self, slot: int, after_nbytes: int, src: np.ndarray, dst: np.ndarray
    ) -> int | None:
        """Put page ids as int32 (sources, then destinations) in the slot's payload past its
        first `after_nbytes`, 4-byte aligned, for the copy kernel to read in place; their
        index in the int32 view of the whole mapping (`device_views`), or None if they do
        not fit."""
        start = -(-(self._map.payload_at(slot) + after_nbytes) // 4)  # in int32 words
        num_pairs = src.size
        if 4 * (start + 2 * num_pairs) > self._map.payload_at(slot + 1):
            return None
        words = self._map.words
        words[start : start + num_pairs] = src
        words[start + num_pairs : start + 2 * num_pairs] = dst
        return start

    def set_flag(self, slot: int, seq: int) -> None:
        """Mark the grant landed from the host (no copy of it is queued)."""
        self._map.flags[slot] = seq

    def passed(self, slot: int, seq: int) -> bool:
        """The flag reached `seq` (or a later grant's number): that grant's copy has run."""
        return bool(self._map.flags[slot] >= seq)

    def device_views(self, device):  # -> tuple[torch.Tensor, torch.Tensor]
        """(flags int64 [num_slots], the whole mapping as int32) as CUDA tensors over this
        mapping, registered with CUDA on first use: the GPU sets flags and reads page ids
        there."""
        import torch

        if not self._registered:
            err = torch.cuda.cudart().cudaHostRegister(self._map.address, self._map.nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the KV completion slots failed ({err})")
            self._registered = True

        def view(shape: tuple[int], dtype: np.dtype):
            interface = {
                "shape": shape,
                "typestr": dtype.str,
                "data": (self._map.address, False),
                "version": 3,
            }
            return torch.as_tensor(_CudaArray(interface), device=device)

        return view((self.num_slots,), FLAG), view((self._map.nbytes // 4,), np.dtype("<i4"))

    def close(self) -> None:
        if self._registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._map.address)
            self._registered = False
        self._map.close()


class _CudaArray:
    """An object exposing `__cuda_array_interface__` (what torch.as_tensor reads)."""

    def __init__(self, interface: dict) -> None:
        self.__cuda_array_interface__ = interface
