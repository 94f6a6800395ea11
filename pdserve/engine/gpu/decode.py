"""The GPU decode step: one new token per row through the fused layer stack of `layers.py`
with in-place paged decode attention (Qwen3's q/k norm fused into the rope kernel). Worker
process (GPU only).

All inputs come from one int32 `meta` tensor with rows [token id, position, seq_len, page
table...], so a step has fixed shapes for a given batch size and can be graph-captured. A
negative token id -(j + 1) stands for the token the previous step sampled in its row j,
which stays on the device (overlap scheduling).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pdserve.engine.gpu.gemv import GEMV_OPS, MAX_GEMV_ROWS
from pdserve.engine.gpu.kernels import rope_and_store_kv
from pdserve.engine.gpu.layers import CUBLAS_OPS, final_hidden, qk_norm_of
from pdserve.engine.gpu.paged_attention import paged_decode_attention
from pdserve.engine.model import ModelArgs, ModelWeights

META_COLS = 3  # columns before the page table: token id, position, seq_len


def pack_meta(
    rows: list[tuple[int, int, list[int]]], num_rows: int, num_table_cols: int
) -> torch.Tensor:
    """int32 [num_rows, META_COLS + num_table_cols] from (token id, position, page ids) per
    real row; rows past the real ones are padding (seq_len 0, token 0, position 0)."""
    meta = np.zeros((num_rows, META_COLS + num_table_cols), dtype=np.int32)
    if rows:
        num_real = len(rows)
        heads = np.array([(t, p, p + 1) for t, p, _ in rows], dtype=np.int32)
        meta[:num_real, :META_COLS] = heads
        lens = np.fromiter((min(len(r[2]), num_table_cols) for r in rows), np.int64, num_real)
        pages = np.fromiter(
            itertools.chain.from_iterable(r[2][:num_table_cols] for r in rows),
            np.int32,
            int(lens.sum()),
        )
        # row-major boolean mask: fills each row's first len slots in order
        meta[:num_real, META_COLS:][np.arange(num_table_cols) < lens[:, None]] = pages
    return torch.from_numpy(meta)


def step_token_ids(meta: torch.Tensor, sampled_ids: torch.Tensor) -> torch.Tensor:
    """Each row's token id, the previous step's `sampled_ids[j]` where meta holds -(j+1)."""
    tokens = meta[:, 0]
    previous = sampled_ids.index_select(0, (-1 - tokens).clamp(min=0))
    return torch.where(tokens < 0, previous, tokens)


def decode_forward(
    weights: ModelWeights,
    args: ModelArgs,
    kv_pool: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: torch.Tensor,
    num_splits: int,
    sampled_ids: torch.Tensor | None = None,
    use_gemv: bool = False,
) -> torch.Tensor:
    """float32 logits [B, vocab] for the B rows of `meta`; writes each row's new K/V.
    `sampled_ids`: the previous step's tokens, which negative token ids refer to.
    `use_gemv`: dense linear layers through the Triton GEMV (SiLU·mul fused into down's
    input) when B <= MAX_GEMV_ROWS."""
    token_ids = meta[:, 0] if sampled_ids is None else step_token_ids(meta, sampled_ids)

    def attend(qkv: torch.Tensor, i: int) -> torch.Tensor:
        q = rope_and_store_kv(
            qkv, cos, sin, meta, kv_pool, i, args.num_heads, args.num_kv_heads,
            qk_norm_of(weights.layers[i], args.rms_norm_eps),
        )  # fmt: skip
        return paged_decode_attention(q, kv_pool, i, meta, num_splits)

    ops = GEMV_OPS if use_gemv and meta.shape[0] <= MAX_GEMV_ROWS else CUBLAS_OPS
    hidden = final_hidden(weights, args, token_ids, attend, ops)
    return ops.linear(weights.lm_head, hidden).float()
