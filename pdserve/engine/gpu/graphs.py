"""CUDA graphs of the GPU decode step, one per batch-size bucket; worker process (GPU only).

Every graph reads the same static `meta` buffer (token, position, seq_len, page table per
row), so a step costs one host-to-device copy and one replay: Python launches no kernels.
A row's token may be one the previous step sampled, read from the static `sampled_ids`.
A batch runs in the smallest bucket that holds it; its padding rows have seq_len 0, which
the kernels skip (no KV write, zero attention output).
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.engine.gpu.decode import META_COLS, decode_forward, pack_meta
from pdserve.engine.gpu.paged_attention import num_splits_for
from pdserve.engine.model import ModelArgs, ModelWeights

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH_SIZE = 256
_SMALL_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)

# (token id, or -(j + 1) for the token the previous step sampled in row j; position; page ids)
Row = tuple[int, int, list[int]]


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes to capture: powers of two, then multiples of 8, 16, 32, up to the max."""
    top = min(max_batch_size, MAX_GRAPH_BATCH_SIZE)
    buckets = [b for b in _SMALL_BUCKETS if b < top]
    return [*buckets, top]


class DecodeGraphs:
    def __init__(
        self,
        weights: ModelWeights,
        args: ModelArgs,
        kv_pool: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        max_batch_size: int,
        max_table_cols: int,
        use_graphs: bool,
        use_gemv: bool = False,
    ) -> None:
        self.weights, self.args, self.kv_pool = weights, args, kv_pool
        self.use_gemv = use_gemv  # the Triton GEMV for dense linear layers at <= 4 rows
        self.cos, self.sin = rope
        self.device = kv_pool.device
        # A CPU device only serves kernel debugging under TRITON_INTERPRET=1 (no graphs).
        is_cuda = self.device.type == "cuda"
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else 4
        )
        self.buckets = batch_buckets(max_batch_size) if use_graphs else []
        rows = self.buckets[-1] if self.buckets else 1
        self.meta = torch.zeros(
            rows, META_COLS + max_table_cols, dtype=torch.int32, device=self.device
        )
        # The tokens the last launched step sampled, row by row (overlap scheduling).
        self.sampled_ids = torch.zeros(
            max(rows, max_batch_size), dtype=torch.int32, device=self.device
        )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.buckets:
            self._capture_all()

    def _splits(self, num_rows: int) -> int:
        return num_splits_for(num_rows, self.args.num_kv_heads, self.num_sms)

    def _forward(self, meta: torch.Tensor) -> torch.Tensor:
        splits = self._splits(meta.shape[0])
        return decode_forward(
            self.weights, self.args, self.kv_pool, self.cos, self.sin, meta, splits,
            self.sampled_ids, self.use_gemv,
        )  # fmt: skip

    def _capture_all(self) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        # meta is all zeros: every row is padding, so warm-up and capture write no KV.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile Triton kernels, pick cuBLAS algorithms
            for bucket in self.buckets:
                self._forward(self.meta[:bucket])
        torch.cuda.current_stream(self.device).wait_stream(side)
        for bucket in reversed(self.buckets):  # largest first: later ones reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(self.meta[:bucket])
            self._graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self._graphs), self.buckets, time.monotonic() - started,
        )  # fmt: skip

    def bucket_for(self, num_rows: int) -> int | None:
        return next((b for b in self.buckets if b >= num_rows), None)

    def keep_sampled(self, token_ids: torch.Tensor) -> None:
        """Record the step's sampled tokens for the next step's negative token ids."""
        self.sampled_ids[: token_ids.shape[0]].copy_(token_ids)

    def run(self, rows: list[Row]) -> torch.Tensor:
        """float32 logits [len(rows), vocab]; valid until the next call."""
        num_rows = len(rows)
        num_table_cols = max(len(page_ids) for _, _, page_ids in rows)
        bucket = self.bucket_for(num_rows)
        packed = pack_meta(rows, bucket or num_rows, num_table_cols)
        # Pinned (torch's caching host allocator): the copy is queued, the host goes on.
        pinned = packed.pin_memory() if self.device.type == "cuda" else packed
        if bucket is None:  # larger than any graph: the same kernels, launched from Python
            return self._forward(pinned.to(self.device, non_blocking=True))
        self.meta[:bucket, : packed.shape[1]].copy_(pinned, non_blocking=True)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:num_rows]
