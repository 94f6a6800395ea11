"""The GPU decode step: one new token per row through the Llama layers (Qwen3 q/k norm, fused
into the rope kernel, and sparse MoE MLPs included) with fused Triton kernels and in-place paged attention. Worker
process (GPU only).

All inputs come from one int32 `meta` tensor with rows [token id, position, seq_len, page
table...], so a step has fixed shapes for a given batch size and can be graph-captured.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.gpu.kernels import rms_norm, rope_and_store_kv, silu_mul
from pdserve.engine.gpu.moe import fused_moe_mlp
from pdserve.engine.gpu.paged_attention import paged_decode_attention
from pdserve.engine.model import LayerWeights, ModelArgs, ModelWeights

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


def decode_forward(
    weights: ModelWeights,
    args: ModelArgs,
    kv_pool: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: torch.Tensor,
    num_splits: int,
) -> torch.Tensor:
    """float32 logits [B, vocab] for the B rows of `meta`; writes each row's new K/V."""
    token_ids = meta[:, 0]
    residual = F.embedding(token_ids, weights.embed)
    eps = args.rms_norm_eps
    h = rms_norm(residual, weights.layers[0].input_norm, eps)
    for i, layer in enumerate(weights.layers):
        qk_norm = None
        if layer.q_norm is not None and layer.k_norm is not None:
            qk_norm = (layer.q_norm, layer.k_norm, eps)
        q = rope_and_store_kv(
            layer.qkv(h), cos, sin, meta, kv_pool, i, args.num_heads, args.num_kv_heads, qk_norm
        )
        attn = paged_decode_attention(q, kv_pool, i, meta, num_splits)
        h = rms_norm(layer.o(attn), layer.post_norm, eps, residual)
        mlp = _mlp(h, layer, args)
        is_last = i + 1 == len(weights.layers)
        next_norm = weights.norm if is_last else weights.layers[i + 1].input_norm
        h = rms_norm(mlp, next_norm, eps, residual)
    return weights.lm_head(h).float()


def _mlp(h: torch.Tensor, layer: LayerWeights, args: ModelArgs) -> torch.Tensor:
    if layer.moe is not None and args.moe is not None:
        return fused_moe_mlp(h, layer.moe, args.moe)
    assert layer.gate_up is not None and layer.down is not None
    return layer.down(silu_mul(layer.gate_up(h)))
