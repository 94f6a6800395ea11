"""Pool pages as data-connection records: the bytes a sender writes, where a receiver's go.

Runs in worker processes, inside the ZeroMQ transport. Page runs that are long on average
(`zero_copy_min_nbytes`) are written straight from the pool and read straight into it;
shorter ones pass through one frame-sized buffer, gathered with one index_select or scattered
with one numpy assignment, so Python never loops over pages one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.zmq.data_channel import (
    MAX_RECORD_NBYTES,
    PREFIX,
    Cursor,
    OutRecord,
    RecvChannel,
    SendChannel,
)
from pdserve.disagg.transfer.zmq.outbox import gather
from pdserve.disagg.transfer.zmq.pages import FramePlan, num_runs, plan_frames, run_bounds


def framed(message: bytes) -> bytes:
    """A record's opening: the message with its length in front."""
    return PREFIX.pack(len(message)) + message


class PageRecords:
    """Lays KV records out over a pool (`pages`: uint8 [num_pages, page_nbytes])."""

    def __init__(self, pages: torch.Tensor, pages_per_frame: int, zero_copy_min_nbytes: int):
        self.pages = pages
        self.pages_np = pages.numpy()
        self.pool_bytes = memoryview(self.pages_np).cast("B")  # runs are slices of it
        self.page_nbytes = int(pages.shape[1])
        self.pages_per_frame = pages_per_frame
        self.zero_copy_min_nbytes = zero_copy_min_nbytes

    def long_runs(self, ids: np.ndarray, num_runs_: int | None = None) -> bool:
        """Whether the runs of `ids` are long enough on average to move in place."""
        count = num_runs(ids) if num_runs_ is None else num_runs_
        return ids.size * self.page_nbytes >= count * self.zero_copy_min_nbytes

    # -- sending -------------------------------------------------------------------------
    def plan(self, src: np.ndarray, dst: np.ndarray) -> list[FramePlan]:
        """Records of a transfer: as large as allowed when both sides move in place, else
        frame-sized, so that a gather or scatter buffer holds one."""
        if self.long_runs(src) and self.long_runs(dst):
            pages_per_record = max(1, MAX_RECORD_NBYTES // self.page_nbytes)
        else:
            pages_per_record = self.pages_per_frame
        return plan_frames(src, dst, pages_per_record)

    def lay_out(self, record: OutRecord, channel: SendChannel) -> Cursor:
        """The record's bytes: its header, then its pages (from the pool or gathered)."""
        if record.plan is None:
            assert record.message is not None
            return Cursor([framed(record.message)])
        plan, room = record.plan, record.handle.room
        header = m.KVHeader(
            room=room,
            frame_page_counts=[plan.num_pages],
            page_nbytes=self.page_nbytes,
            dst_page_ids=plan.dst.tolist(),
        )
        return Cursor([framed(m.encode(header)), *self._source(plan.src, channel)])

    def _in_place(self, ids: np.ndarray, always: bool = False) -> list[memoryview] | None:
        """The pool slices of the runs of `ids`; None if they are too short (unless `always`)."""
        bounds = run_bounds(ids, self.page_nbytes)
        if not always and not self.long_runs(ids, len(bounds)):
            return None
        return [self.pool_bytes[a:b] for a, b in bounds]

    def _source(self, src: np.ndarray, channel: SendChannel) -> list[Any]:
        # A record longer than a frame was planned for long runs: no buffer would hold it.
        in_place = self._in_place(src, always=src.size > self.pages_per_frame)
        if in_place is not None:
            return in_place
        if channel.staging is None:
            # zeros, not empty: touch the memory now rather than page-faulting on the hot path
            channel.staging = torch.zeros(
                (self.pages_per_frame, self.page_nbytes), dtype=torch.uint8
            )
        return [gather(self.pages, src, channel.staging)]

    # -- receiving -----------------------------------------------------------------------
    def sink(
        self, dst: np.ndarray, channel: RecvChannel
    ) -> tuple[Cursor, Callable[[], None] | None]:
        """Where the pages for `dst` are read to, and the scatter to run once they are in
        (None when they are read straight into the pool)."""
        in_place = self._in_place(dst)
        if in_place is not None:
            return Cursor(in_place), None
        if channel.scratch is None or channel.scratch.shape[0] < dst.size:
            channel.scratch = np.zeros((dst.size, self.page_nbytes), dtype=np.uint8)
        scratch = channel.scratch[: dst.size]

        def scatter() -> None:
            self.pages_np[dst] = scratch  # numpy scatter: one call, no per-page loop

        return Cursor([scratch]), scatter
