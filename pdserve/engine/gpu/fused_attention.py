"""Decode attention in one Triton launch per layer (`--decode-attention fused`): (Qwen3 q/k
norm +) rope, the new token's K/V store, paged attention split along the sequence, and the
merge of the splits by the split that finishes last. Worker process (GPU only; the CPU runs
it under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.engine.gpu.kernels import _head_norm
from pdserve.engine.gpu.paged_attention import BLOCK_N


@triton.jit
def _rope_heads(
    src, heads, head_mask, d, dmask, c, s, norm_ptr, eps,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    """Heads [rows] of one token at src, (RMS-normalised and) rotated, rounded to the
    activation dtype as `_rope_store_kernel` rounds them: two halves [rows, HALF_P]."""
    mask = head_mask[:, None] & dmask[None, :]
    ptr = src + heads[:, None] * HEAD_DIM + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    if QK_NORM:
        x1, x2 = _head_norm(x1, x2, norm_ptr, d, dmask, eps, HALF, HEAD_DIM)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * c - x2 * s).to(dtype), (x2 * c + x1 * s).to(dtype)


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, out_ptr, part, q_off, hmask, out_mask, dv,
    GROUP_P: tl.constexpr, DIM_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):  # fmt: skip
    """Weigh the splits' partial outputs of heads [GROUP_P] by their LSE (as `_merge_kernel`),
    reading what other programs wrote through L2 (.cg: L1 is not coherent across SMs)."""
    sp = tl.arange(0, SPLITS_P)
    lse_mask = hmask[:, None] & (sp < NUM_SPLITS)[None, :]
    lse = tl.load(
        part_lse_ptr + part[:, None] + sp[None, :], mask=lse_mask, other=float("-inf"),
        cache_modifier=".cg",
    )  # fmt: skip
    top = tl.max(lse, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.maximum(tl.sum(tl.exp2(lse - top[:, None]), axis=1), 1e-30)
    out = tl.zeros([GROUP_P, DIM_P], tl.float32)
    for s in tl.static_range(NUM_SPLITS):  # unrolled: every split's loads in flight at once
        lse_s = tl.load(part_lse_ptr + part + s, mask=hmask, other=0.0, cache_modifier=".cg")
        w = tl.exp2(lse_s - top)
        parts = tl.load(
            part_out_ptr + (part + s)[:, None] * HEAD_DIM + dv[None, :], mask=out_mask,
            other=0.0, cache_modifier=".cg",
        )  # fmt: skip
        out += (w / total)[:, None] * parts
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fused_decode_kernel(
    qkv_ptr, cos_ptr, sin_ptr, meta_ptr, kv_ptr, q_norm_ptr, k_norm_ptr, eps,
    out_ptr, part_out_ptr, part_lse_ptr, count_ptr,
    stride_meta, stride_cos, stride_page, layer_offset, stride_kv, stride_tok, stride_head,
    qk_scale,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_P: tl.constexpr, DIM_P: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
    BLOCK: tl.constexpr, QK_NORM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (row, KV head, split). The new token sits at position pos == seq_len - 1 (as
    `pack_meta` writes it): split 0 stores its K/V, and the split covering pos takes it
    from registers. No program reads that slot: programs of one launch are unordered."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HALF = HEAD_DIM // 2
    pos32 = tl.load(meta_ptr + b * stride_meta + 1)
    pos = pos32.to(tl.int64)
    seq_len = tl.load(meta_ptr + b * stride_meta + 2)
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    src = qkv_ptr + b * (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    g = tl.arange(0, GROUP_P)
    hmask = g < GROUP
    heads = kvh * GROUP + g
    q1, q2 = _rope_heads(
        src, heads, hmask, d, dmask, c, s, q_norm_ptr, eps, HALF, HEAD_DIM, QK_NORM
    )  # fmt: skip
    one = tl.arange(0, 1)
    k1_new, k2_new = _rope_heads(
        src, NUM_HEADS + kvh + one, one == 0, d, dmask, c, s, k_norm_ptr, eps,
        HALF, HEAD_DIM, QK_NORM,
    )  # fmt: skip
    dv = tl.arange(0, DIM_P)
    dvmask = dv < HEAD_DIM
    v_src = src + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM
    v_new = tl.load(v_src + dv[None, :], mask=dvmask[None, :], other=0.0)  # [1, DIM_P]

    if (split == 0) & (seq_len > 0):
        new_page = tl.load(meta_ptr + b * stride_meta + 3 + pos // PAGE_SIZE).to(tl.int64)
        slot = new_page * stride_page + layer_offset + (pos % PAGE_SIZE) * stride_tok
        dst = kv_ptr + slot + kvh * stride_head
        tl.store(dst + d[None, :], k1_new.to(kv_ptr.dtype.element_ty), mask=dmask[None, :])
        tl.store(dst + HALF + d[None, :], k2_new.to(kv_ptr.dtype.element_ty), mask=dmask[None, :])
        tl.store(dst + stride_kv + dv[None, :], v_new, mask=dvmask[None, :])

    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK) * BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    table = meta_ptr + b * stride_meta + 3
    stop = tl.minimum(end, pos32)  # the pool's tokens before the new one
    for t0 in range(start, stop, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tmask = t < stop
        page = tl.load(table + t // PAGE_SIZE, mask=tmask, other=0).to(tl.int64)
        row = page * stride_page + layer_offset + (t % PAGE_SIZE) * stride_tok + kvh * stride_head
        k_ptr = kv_ptr + row[:, None] + d[None, :]
        k_mask = tmask[:, None] & dmask[None, :]
        k1 = tl.load(k_ptr, mask=k_mask, other=0.0)
        k2 = tl.load(k_ptr + HALF, mask=k_mask, other=0.0)
        sc = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        sc = tl.dot(q2, tl.trans(k2), acc=sc, input_precision=PRECISION) * qk_scale  # log2
        sc = tl.where(tmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_mask = tmask[:, None] & dvmask[None, :]
        v = tl.load(kv_ptr + stride_kv + row[:, None] + dv[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if (start <= pos32) & (pos32 < end):  # this split covers the new token
        k1f, k2f = k1_new.to(tl.float32), k2_new.to(tl.float32)
        sc_new = tl.sum(q1.to(tl.float32) * k1f, axis=1) + tl.sum(q2.to(tl.float32) * k2f, axis=1)
        sc_new = sc_new * qk_scale
        m_tok = tl.maximum(m_i, sc_new)
        alpha_tok = tl.exp2(m_i - m_tok)
        p_tok = tl.exp2(sc_new - m_tok)
        l_i = l_i * alpha_tok + p_tok
        p_v = p_tok.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
        acc = acc * alpha_tok[:, None] + p_v
        m_i = m_tok

    # An empty split (or a padding row, seq_len 0) has l_i == 0: weight zero in the merge.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    q_off = (b * NUM_HEADS + heads)[:, None] * HEAD_DIM + dv[None, :]
    out_mask = hmask[:, None] & dvmask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (b * NUM_HEADS + heads) * NUM_SPLITS
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part + split, lse, mask=hmask)
        tl.store(
            part_out_ptr + (part + split)[:, None] * HEAD_DIM + dv[None, :], out, mask=out_mask
        )
        tl.debug_barrier()  # every thread's partials are stored before the count releases them
        count = count_ptr + b * NUM_KV_HEADS + kvh
        arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            _merge_splits(
                part_out_ptr, part_lse_ptr, out_ptr, part, q_off, hmask, out_mask, dv,
                GROUP_P, DIM_P, HEAD_DIM, NUM_SPLITS, SPLITS_P,
            )  # fmt: skip
            tl.store(count, 0)  # ready for the next layer, call or graph replay


@dataclass(frozen=True)
class SplitWorkspace:
    """Per-split partial outputs [B, H, splits, D] and LSEs [B, H, splits] (fp32), and the
    arrival count of each (row, KV head) [B, KVH] (int32, zero between calls)."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    counts: torch.Tensor


_workspaces: dict[tuple, SplitWorkspace] = {}


def split_workspace(
    device: torch.device, num_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
    num_splits: int,
) -> SplitWorkspace:  # fmt: skip
    """Allocated on the first call for a shape and reused by every layer and call, so a CUDA
    graph captures fixed addresses; the counts start at zero and the merging program puts
    them back to zero. Calls of one shape must run one after another (one stream)."""
    key = (device, num_rows, num_heads, num_kv_heads, head_dim, num_splits)
    if key not in _workspaces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"decode attention workspace {key} missing: call before capture")
        _workspaces[key] = SplitWorkspace(
            torch.empty(num_rows, num_heads, num_splits, head_dim, device=device),
            torch.empty(num_rows, num_heads, num_splits, device=device),
            torch.zeros(num_rows, num_kv_heads, dtype=torch.int32, device=device),
        )
    return _workspaces[key]


def fused_decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    num_splits: int,
) -> torch.Tensor:
    """What `rope_and_store_kv` then `paged_decode_attention` compute, in one launch: the
    rows of qkv [B, (H + 2 KVH) * D] (meta rows: [token, position, seq_len, page table...])
    rotated, their K/V stored in layer `layer` of kv_pool [N, L, 2, page, KVH, D], and their
    attention over the row's first seq_len tokens. Returns [B, H * D]; padding rows (seq_len
    0) get zeros and store nothing. qk_norm as in `rope_and_store_kv`."""
    num_rows = qkv.shape[0]
    head_dim = kv_pool.shape[-1]
    group = num_heads // num_kv_heads
    out = torch.empty(num_rows, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    parts: tuple[torch.Tensor, ...] = (out, out, out)
    if num_splits > 1:
        ws = split_workspace(qkv.device, num_rows, num_heads, num_kv_heads, head_dim, num_splits)
        parts = (ws.part_out, ws.part_lse, ws.counts)
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (out, out, 0.0)
    s_page, s_layer, s_kv, s_tok, s_head, _ = kv_pool.stride()
    _fused_decode_kernel[(num_rows, num_kv_heads, num_splits)](
        qkv, cos, sin, meta, kv_pool, q_norm, k_norm, eps, out, *parts,
        meta.stride(0), cos.stride(0), s_page, layer * s_layer, s_kv, s_tok, s_head,
        (1.0 / math.sqrt(head_dim)) * math.log2(math.e),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HALF_P=max(16, triton.next_power_of_2(head_dim // 2)),
        DIM_P=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=kv_pool.shape[3],
        NUM_SPLITS=num_splits, SPLITS_P=max(2, triton.next_power_of_2(num_splits)),
        BLOCK=BLOCK_N, QK_NORM=qk_norm is not None,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
