"""Model runner for CUDA devices: prefill chunks run the fused Triton layer stack with paged
prefill attention; decode steps the Triton kernels, replayed from CUDA graphs. Worker
process (GPU only)."""

from __future__ import annotations

import torch

from pdserve.engine.attention import Segment
from pdserve.engine.gpu.graphs import DecodeGraphs
from pdserve.engine.gpu.prefill import pack_prefill_meta, prefill_hidden
from pdserve.engine.loader import LoadedModel
from pdserve.engine.overlap import LaunchedDecode, decode_rows
from pdserve.engine.request import Request
from pdserve.engine.runner import ItemRows, ModelRunner
from pdserve.engine.scheduler import Batch


class GpuModelRunner(ModelRunner):
    def __init__(
        self,
        model: LoadedModel,
        kv_pool: torch.Tensor,
        page_size: int,
        max_len: int,
        max_batch_size: int,
        cuda_graphs: bool,
        decode_gemv: bool = False,
    ):
        super().__init__(model, kv_pool, page_size, max_len)
        if self.device.type == "cuda":  # graphs and Triton launch on the current device
            torch.cuda.set_device(self.device)
        self.decoder = DecodeGraphs(
            model.weights,
            model.args,
            kv_pool,
            (self.cos, self.sin),
            max_batch_size,
            max_table_cols=-(-max_len // page_size),
            use_graphs=cuda_graphs,
            use_gemv=decode_gemv,
        )

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[ItemRows]]:
        reqs = batch.decode
        # Scheduler steps are all-prefill or all-decode; prompt logprobs still owed (never
        # the case after prefill) need the general path (which prefills on this GPU too).
        if batch.prefill or any(
            r.wants_prompt_logprobs and not r.prompt_logprobs_sent for r in reqs
        ):
            return super().run(batch)
        rows = [(r.token_at(r.seq_len - 1), r.seq_len - 1, r.page_ids) for r in reqs]
        logits = self.decoder.run(rows)
        return logits, [ItemRows(r, 1, i) for i, r in enumerate(reqs)]

    @torch.inference_mode()
    def launch_decode(self, reqs: list[Request], previous: LaunchedDecode | None) -> LaunchedDecode:
        """Queue a decode step and its sampling; no host sync for greedy and temperature-only
        rows. A request of the `previous` launch decodes the token that launch sampled, read
        on the device: the step may be queued before that one has finished."""
        rows = decode_rows(reqs, previous)
        logits = self.decoder.run(
            [
                (r.token_id if r.prev_row is None else -1 - r.prev_row, r.position, r.req.page_ids)
                for r in rows
            ]
        )
        token_ids = self.sample_decode(logits, rows, previous)
        self.decoder.keep_sampled(token_ids)
        return LaunchedDecode.start(reqs, token_ids)

    def _hidden_states(
        self, segments: list[Segment], token_ids: list[int], positions: list[int]
    ) -> torch.Tensor:
        meta = pack_prefill_meta(segments, token_ids, self.page_size, self.device)
        return prefill_hidden(
            self.model.weights, self.model.args, self.kv_pool, self.cos, self.sin, meta
        )
