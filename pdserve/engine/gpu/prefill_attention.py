"""Paged attention for prefill chunks as a Triton kernel: each chunk's new tokens attend over
their sequence's KV pages in place (no gather), causally within the chunk. Worker process.

A launch covers a ragged batch of chunks: chunk b has queries at rows [cu_q[b], cu_q[b+1])
and positions start[b] + i; its keys are positions [0, start[b] + num_q) read through its
page table, cached prefix (earlier chunks, shared prefix pages) and the chunk's own tokens
alike, all stored before the launch. Flash-attention style: online softmax over key blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, kv_ptr, table, head_off, t0, end, q_pos,
    stride_page, stride_kv, stride_tok, qk_scale,
    d, dmask, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block [t0, t0 + BLOCK_N) folded into the running softmax. Without CAUSAL
    every key of the block is below `end` and visible to every query."""
    t = t0 + tl.arange(0, BLOCK_N)
    tmask = t < end
    page = tl.load(table + t // PAGE_SIZE, mask=tmask, other=0).to(tl.int64)
    row = page * stride_page + head_off + (t % PAGE_SIZE) * stride_tok
    k_t = tl.load(
        kv_ptr + row[None, :] + d[:, None], mask=dmask[:, None] & tmask[None, :], other=0.0
    )  # [D, N]: K transposed
    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # log2 units
    if CAUSAL:
        visible = (t[None, :] <= q_pos[:, None]) & tmask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_mask = tmask[:, None] & dmask[None, :]
    v = tl.load(kv_ptr + stride_kv + row[:, None] + d[None, :], mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, kv_ptr, out_ptr, cu_q_ptr, start_ptr, table_ptr,
    stride_table, stride_page, layer_offset, stride_kv, stride_tok, stride_head, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_P: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Heads vary fastest: the GROUP heads of one KV head run together and share its K/V in L2.
    h = tl.program_id(0)
    m_block = tl.program_id(1)
    b = tl.program_id(2)
    q_first = tl.load(cu_q_ptr + b)
    num_q = tl.load(cu_q_ptr + b + 1) - q_first
    if m_block * BLOCK_M >= num_q:
        return
    start = tl.load(start_ptr + b)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_P)
    dmask = d < HEAD_DIM
    io_mask = (offs_m < num_q)[:, None] & dmask[None, :]
    q_off = ((q_first + offs_m).to(tl.int64) * NUM_HEADS + h)[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    q_pos = start + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P], tl.float32)
    table = table_ptr + b.to(tl.int64) * stride_table
    head_off = layer_offset + (h // GROUP) * stride_head
    # Keys below the block's first query position are visible to all its queries: no mask.
    # The first masked block holds a key every row sees, so no row's maximum stays -inf.
    full_end = (start + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
    for t0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, kv_ptr, table, head_off, t0, full_end, q_pos,
            stride_page, stride_kv, stride_tok, qk_scale, d, dmask,
            PAGE_SIZE, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    end = start + tl.minimum((m_block + 1) * BLOCK_M, num_q)
    for t0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, kv_ptr, table, head_off, t0, end, q_pos,
            stride_page, stride_kv, stride_tok, qk_scale, d, dmask,
            PAGE_SIZE, BLOCK_N, True, PRECISION,
        )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _launch_params(dtype: torch.dtype, head_dim: int) -> dict[str, int | str]:
    if dtype == torch.float32:  # tests and debugging: exact products, smaller tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, PRECISION="ieee")
    warps = 8 if head_dim > 64 else 4
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=3, PRECISION="tf32")


def paged_prefill_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    cu_q: torch.Tensor,
    starts: torch.Tensor,
    page_table: torch.Tensor,
    max_q: int,
) -> torch.Tensor:
    """Attention of q [T, H, D] for a ragged batch of chunks (their K/V already stored in
    layer `layer` of kv_pool [N, L, 2, page, KVH, D]). cu_q int32 [B + 1]: chunk b's query
    rows; starts int32 [B]: its first position; page_table int32 [B, P]: its pages; max_q:
    the most queries of one chunk. Returns [T, H * D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_pool.shape[4]
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    params = _launch_params(q.dtype, head_dim)
    num_chunks = starts.shape[0]
    grid = (num_heads, triton.cdiv(max_q, params["BLOCK_M"]), num_chunks)
    s_page, s_layer, s_kv, s_tok, s_head, _ = kv_pool.stride()
    _prefill_attention_kernel[grid](
        q, kv_pool, out, cu_q, starts, page_table,
        page_table.stride(0), s_page, layer * s_layer, s_kv, s_tok, s_head,
        (1.0 / math.sqrt(head_dim)) * math.log2(math.e),
        NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        DIM_P=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=kv_pool.shape[3],
        **params,
    )  # fmt: skip
    return out
