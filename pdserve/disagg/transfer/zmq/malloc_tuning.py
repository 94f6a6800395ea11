"""glibc malloc tuning for processes that receive KV through ZeroMQ (worker processes).

ZeroMQ mallocs a fresh buffer for every large inbound frame. With glibc's default, dynamic
thresholds, freed multi-MiB buffers are soon trimmed back to the OS, so the next frames
page-fault their way in: measured at thousands of faults per 64 MiB received and a third more
CPU per byte. Fixed thresholds keep that memory in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_NBYTES = 32 << 20  # glibc's maximum; frames are far smaller
TRIM_THRESHOLD_NBYTES = 256 << 20  # free heap memory kept for reuse before trimming

_done = False


def keep_freed_memory() -> bool:
    """Apply the tuning once per process; False where there is no glibc mallopt."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_NBYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_NBYTES) == 1 and ok
    if not ok:
        log.debug("mallopt refused the KV receive-buffer tuning")
    _done = ok
    return ok
