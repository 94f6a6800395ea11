"""Paged attention for decode as Triton kernels: each new token attends over its sequence's
KV pages in place (no gather), split along the sequence and merged. Worker process (GPU).

One program handles all query heads of one KV head (GQA), so each K/V row is read once.
Shapes are fixed by the batch size alone, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # tokens per inner iteration
MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, meta_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_meta, stride_page, layer_offset, stride_kv, stride_tok, stride_head, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(meta_ptr + b * stride_meta + 2)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK) * BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, DIM_P)
    heads = kvh * GROUP + g
    hmask = g < GROUP
    dmask = d < HEAD_DIM
    q_off = (b * NUM_HEADS + heads)[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=hmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    table = meta_ptr + b * stride_meta + 3
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tmask = t < end
        page = tl.load(table + t // PAGE_SIZE, mask=tmask, other=0).to(tl.int64)
        row = page * stride_page + layer_offset + (t % PAGE_SIZE) * stride_tok + kvh * stride_head
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + stride_kv + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (or a padding row, seq_len 0) has l_i == 0: weight zero in the merge.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out_mask = hmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (b * NUM_HEADS + heads) * NUM_SPLITS + split
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=hmask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):  # fmt: skip
    """One program per (token, head): merge the splits' partial outputs by their LSE."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS_P)
    d = tl.arange(0, DIM_P)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    parts = tl.load(
        part_out_ptr + (row * NUM_SPLITS + sp)[:, None] * HEAD_DIM + d[None, :],
        mask=(sp < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * parts, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits_for(num_rows: int, num_kv_heads: int, num_sms: int) -> int:
    """Enough programs to cover the GPU about twice over, at most MAX_SPLITS."""
    want = math.ceil(2 * num_sms / max(1, num_rows * num_kv_heads))
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want)))


def paged_decode_attention(
    q: torch.Tensor, kv_pool: torch.Tensor, layer: int, meta: torch.Tensor, num_splits: int
) -> torch.Tensor:
    """Attention of q [B, H, D] (one new token per row, its KV already stored) over the first
    seq_len tokens of the row's pages. meta rows: [token, position, seq_len, page table...].
    Returns [B, H * D]; padding rows (seq_len 0) get zeros."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = kv_pool.shape[4]
    group = num_heads // num_kv_heads
    out = torch.empty(num_rows, num_heads * head_dim, dtype=q.dtype, device=q.device)
    part_out = part_lse = out
    if num_splits > 1:
        part_out = torch.empty(num_rows, num_heads, num_splits, head_dim, device=q.device)
        part_lse = torch.empty(num_rows, num_heads, num_splits, device=q.device)
    s_page, s_layer, s_kv, s_tok, s_head, _ = kv_pool.stride()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(num_rows, num_kv_heads, num_splits)](
        q, kv_pool, meta, out, part_out, part_lse,
        meta.stride(0), s_page, layer * s_layer, s_kv, s_tok, s_head,
        (1.0 / math.sqrt(head_dim)) * math.log2(math.e),
        NUM_HEADS=num_heads, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_P=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=kv_pool.shape[3], NUM_SPLITS=num_splits, BLOCK=BLOCK_N, PRECISION=precision,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _merge_kernel[(num_rows * num_heads,)](
            part_out, part_lse, out,
            HEAD_DIM=head_dim, DIM_P=triton.next_power_of_2(head_dim),
            NUM_SPLITS=num_splits, SPLITS_P=max(2, triton.next_power_of_2(num_splits)),
        )  # fmt: skip
    return out
