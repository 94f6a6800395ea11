"""The prefill side of the cuda_ipc KV transport (cuda_ipc.py), as records: each decode
peer's pool and completion slots mapped here, how this GPU copies into them, and the page
grants decode made, with the check a send_kv must pass. Runs in prefill worker processes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdserve.disagg.transfer.ipc_flags import FLAG, SlotWriter
from pdserve.disagg.transfer.ipc_pool import PAGE_ID, IpcStatus, encode
from pdserve.disagg.transfer.zmq.pages import page_array

if TYPE_CHECKING:
    from pdserve.engine.gpu.copy_pages import PageCopier


@dataclass
class Target:
    """Prefill side: one decode peer's pool and completion slots, mapped here."""

    words: torch.Tensor  # the peer's pool, int64 words (bytes where pages are not whole words)
    slots: SlotWriter
    gpu: TargetGpu | None = None  # made at the first copy


@dataclass
class TargetGpu:
    """How this process's GPU reaches one peer's slots: CUDA views of them, the page copy
    into the peer's pool (ids read in place from the slots, or, for page lists too long for
    a slot, from an id ring), the flags' device address."""

    flags: torch.Tensor  # int64 [num_slots]
    slot_words: torch.Tensor  # int32, the whole mapping (ids are read from it in place)
    copy: Copiers | None  # None where the peer's pool is on another GPU
    flags_at: int  # device address of flag 0

    def flag_address(self, slot: int) -> int:
        return self.flags_at + slot * FLAG.itemsize


@dataclass
class Copiers:
    in_slots: PageCopier  # ids in the slot's payload
    in_ring: PageCopier  # ids in `ring`
    ring: IdRing
    uploaded: PageCopier  # ids in `ids`
    ids: torch.Tensor  # int32 [2 * the peer's pool pages] on this GPU

    def long(self, src: np.ndarray, dst: np.ndarray, copied: Callable[[], bool], stream: int):
        """Copy pages whose ids do not fit a slot: ids read in place from the ring, or, while
        it is full, uploaded first."""
        at = self.ring.put(src, dst, copied)
        if at is not None:
            self.in_ring(at, int(src.size), stream)
        else:
            self.upload(src, dst, stream)

    def upload(self, src: np.ndarray, dst: np.ndarray, stream: int) -> None:
        """The ids go into `ids` on the current stream (from pageable memory: staged before
        the call returns, 0.17 ms for 512 pairs on an H100 host), so a later upload cannot
        overtake this copy's reads."""
        staged = torch.from_numpy(np.concatenate([src, dst]).astype(PAGE_ID))
        self.ids[: staged.numel()].copy_(staged, non_blocking=True)
        self.uploaded(0, int(src.size), stream)


class IdRing:
    """Page ids too long for a slot's payload, in host memory the GPU reads in place (pinned):
    each copy takes the next free stretch (sources, then destinations), which is free again
    once `copied()` says its copy has run. Copies queued on one stream run in order, so
    stretches free from the oldest on; `put` never waits."""

    def __init__(self, words: np.ndarray) -> None:
        self.words = words  # int32
        self._held: deque[tuple[int, int, Callable[[], bool]]] = deque()  # (start, end, copied)

    def put(self, src: np.ndarray, dst: np.ndarray, copied: Callable[[], bool]) -> int | None:
        """Where the ids went (an index into `words`), or None if no stretch is free."""
        while self._held and self._held[0][2]():
            self._held.popleft()
        n, capacity = 2 * src.size, self.words.size
        if not self._held:
            start = 0 if n <= capacity else None
        else:
            head, tail = self._held[0][0], self._held[-1][1]
            if tail > head:  # held: [head, tail); free: [tail, capacity) and [0, head)
                start = tail if capacity - tail >= n else 0 if head >= n else None
            else:  # wrapped, held: [head, capacity) and [0, tail); free: [tail, head)
                start = tail if head - tail >= n else None
        if start is None:
            return None
        self.words[start : start + src.size] = src
        self.words[start + src.size : start + n] = dst
        self._held.append((start, start + n, copied))
        return start

    @property
    def held(self) -> int:
        """Stretches whose copies may not have run."""
        return len(self._held)


@dataclass
class Grant:
    """Prefill side: pages a decode peer gave one room, and the slot that ends the grant."""

    slot: int
    seq: int
    dst: np.ndarray
    expires_at: float
    dst_ids: list[int]  # `dst` as the page list gave it (compared with send_kv's as lists)


def refusal(
    grant: Grant | None, target: Target | None, dst: np.ndarray, dst_ids: list[int]
) -> str | None:
    """Why a send_kv to `dst` (`dst_ids` as the caller gave them) may not write (None: it
    may)."""
    if grant is None:
        return "decode granted no pages for this room here (aborted, or not asked yet)"
    if target is None:
        return "decode's KV pool is not mapped here"
    if time.monotonic() > grant.expires_at:
        return "decode's page grant expired"
    # The usual case: the page list as it came (compared as lists, the cheapest way).
    if dst is grant.dst or isinstance(dst_ids, list) and dst_ids == grant.dst_ids:
        return None
    if np.array_equal(dst, grant.dst):
        return None
    if dst.size > grant.dst.size or not np.isin(dst, grant.dst).all():
        return "destination pages outside decode's grant"
    if np.unique(dst).size != dst.size:
        return "duplicate destination pages"
    return None


def send_pairs(
    grant: Grant | None, src_ids: list[int], dst_ids: list[int], num_pages: int
) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) arrays of a send_kv into `grant` from a pool of `num_pages`; ValueError
    unless both are flat, of one length, and src is in range. A source page named twice
    writes nothing outside the grant, so src is not checked for duplicates (`refusal` checks
    dst). Where the caller names the granted pages, as it does unless it has a bug, dst is
    the grant's own array, checked when the grant came: no conversion on the hot path (512
    pages: 24 against 50 us on this project's 2-core machine)."""
    src = page_array(src_ids, num_pages, "src_page_ids", distinct=False)
    if grant is not None and isinstance(dst_ids, list) and dst_ids == grant.dst_ids:
        dst = grant.dst
    else:
        dst = np.asarray(dst_ids, dtype=np.int64)
    if dst.ndim != 1:
        raise ValueError("dst_page_ids must be a flat list of page ids")
    if dst.size != src.size:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    return src, dst


def set_host(target: Target, grant: Grant, landed: IpcStatus | None) -> None:
    """End a grant from the host: the payload, then the flag (nothing queued on the GPU)."""
    target.slots.write_status(grant.slot, None if landed is None else encode(landed))
    target.slots.set_flag(grant.slot, grant.seq)


def as_words(pages: torch.Tensor) -> torch.Tensor:
    """A uint8 pool [num_pages, page_nbytes] as int64 words where pages are whole words: the
    copy kernel moves 8 bytes per load (computed once per pool, not per copy)."""
    return pages.view(torch.int64) if pages.shape[1] % 8 == 0 else pages
