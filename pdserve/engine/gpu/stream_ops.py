"""Host-cheap CUDA calls for the KV transport's hot path (GPU only): the current stream's
handle, device addresses of registered host memory, and a 64-bit write into memory queued
on a stream after the work before it (the driver's cuStreamWriteValue64) instead of a
one-element fill kernel.

A completion flag set this way costs one ctypes call on the host (a torch `fill_` on a
host-mapped tensor is a tensor view and a kernel launch). The write is fenced like a
`__threadfence_system()` after the stream's earlier work, so whoever sees the flag also
sees the bytes that work wrote. Where the driver refuses stream memory operations, callers
fall back to a fill.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)


def current_stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of `device`'s current stream (what kernels are queued on)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's launcher uses
    if raw is not None:
        return int(raw(device.index if device.index is not None else torch.cuda.current_device()))
    return int(torch.cuda.current_stream(device).cuda_stream)


class StreamWriter:
    """`write(stream, address, value)`: *address := value (int64) once the stream's earlier
    work has run. `address` is device-visible memory, e.g. host memory registered with
    CUDA. `write` returns False, queuing nothing, where the driver has no stream memory
    operations; it then stays off for this writer."""

    def __init__(self, enabled: bool = True) -> None:
        self._fn = _write_value64() if enabled else None

    @property
    def available(self) -> bool:
        return self._fn is not None

    def write(self, stream: int, address: int, value: int) -> bool:
        if self._fn is None:
            return False
        err = self._fn(stream, address, value, 0)  # 0: fenced after the earlier work
        if err != 0:
            log.warning(
                "cuStreamWriteValue64 failed (CUresult %d): completion flags by kernel", err
            )
            self._fn = None
            return False
        return True


def device_pointer(address: int) -> int:
    """The address kernels use for `address`: itself for device memory, the mapped address
    for host memory registered with CUDA (as Triton's launcher resolves tensors' pointers)."""
    libcuda = _libcuda()
    if libcuda is None:
        return address
    out = ctypes.c_uint64()
    err = libcuda.cuPointerGetAttribute(
        ctypes.byref(out), _DEVICE_POINTER, ctypes.c_uint64(address)
    )
    if err != 0:
        raise RuntimeError(f"cuPointerGetAttribute failed (CUresult {err})")
    return out.value


_DEVICE_POINTER = 3  # CU_POINTER_ATTRIBUTE_DEVICE_POINTER


@functools.cache
def _libcuda() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")  # loaded already by torch: the same handle
    except OSError:
        return None


@functools.cache
def _write_value64():  # -> the ctypes function, or None
    libcuda = _libcuda()
    for name in ("cuStreamWriteValue64_v2", "cuStreamWriteValue64"):
        fn = getattr(libcuda, name, None) if libcuda is not None else None
        if fn is not None:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            return fn
    return None
