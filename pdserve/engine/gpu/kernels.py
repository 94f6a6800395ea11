"""Fused elementwise Triton kernels for the GPU decode and prefill steps: residual add +
RMSNorm, (Qwen3 per-head q/k RMSNorm +) rope + KV-page store, SiLU-and-multiply. Worker
process (GPU only).

Each matches the rounding of the plain PyTorch model in `engine/model.py` (and transformers):
intermediate results are rounded to the activation dtype where those round them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        # residual += x, rounded like `x = x + delta` in the activation dtype.
        r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of rows of x [T, N]; with `residual`, first `residual += x` in place and
    normalise the sum."""
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    out = torch.empty_like(x)
    n_cols = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, n_cols, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
        num_warps=4 if n_cols <= 4096 else 8,
    )  # fmt: skip
    return out


@triton.jit
def _rope_store_kernel(
    qkv_ptr, q_out_ptr, cos_ptr, sin_ptr, meta_ptr, kv_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_meta, stride_cos, stride_page, layer_offset, stride_kv, stride_tok, stride_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HALF_P: tl.constexpr, DIM_P: tl.constexpr,
    QK_NORM: tl.constexpr,
):  # fmt: skip
    """One program per (token, head), heads = query heads then KV heads. meta rows are
    [token id, position, seq_len, page table...]; seq_len 0 marks a padding row. With
    QK_NORM, each q and k head is RMS-normalised (rounded as `model.rms_norm`) before rope."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half = HEAD_DIM // 2
    qkv_stride = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    pos = tl.load(meta_ptr + b * stride_meta + 1).to(tl.int64)
    d = tl.arange(0, HALF_P)
    dmask = d < half
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    src = qkv_ptr + b * qkv_stride + h * HEAD_DIM
    x1 = tl.load(src + d, mask=dmask, other=0.0)
    x2 = tl.load(src + half + d, mask=dmask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
        norm_ptr = q_norm_ptr if h < NUM_HEADS else k_norm_ptr
        w1 = tl.load(norm_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + half + d, mask=dmask, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if h < NUM_HEADS:
        dst = q_out_ptr + (b * NUM_HEADS + h) * HEAD_DIM
        tl.store(dst + d, o1.to(q_out_ptr.dtype.element_ty), mask=dmask)
        tl.store(dst + half + d, o2.to(q_out_ptr.dtype.element_ty), mask=dmask)
    else:
        kvh = h - NUM_HEADS
        seq_len = tl.load(meta_ptr + b * stride_meta + 2)
        if seq_len > 0:
            page = tl.load(meta_ptr + b * stride_meta + 3 + pos // PAGE_SIZE).to(tl.int64)
            dst = (
                kv_ptr + page * stride_page + layer_offset
                + (pos % PAGE_SIZE) * stride_tok + kvh * stride_head
            )  # fmt: skip
            tl.store(dst + d, o1.to(kv_ptr.dtype.element_ty), mask=dmask)
            tl.store(dst + half + d, o2.to(kv_ptr.dtype.element_ty), mask=dmask)
            dv = tl.arange(0, DIM_P)
            v_src = qkv_ptr + b * qkv_stride + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM
            v = tl.load(v_src + dv, mask=dv < HEAD_DIM)
            tl.store(dst + stride_kv + dv, v, mask=dv < HEAD_DIM)


def rope_and_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotate q and k of one new token per row of qkv [B, (H + 2 KVH) * D]; store k and v in
    the row's page slot of layer `layer` of kv_pool [N, L, 2, page, KVH, D]. Returns q [B, H, D].
    qk_norm: (q weight [D], k weight [D], eps) of Qwen3's per-head RMSNorm, applied first."""
    num_rows = qkv.shape[0]
    head_dim = kv_pool.shape[-1]
    q = torch.empty(num_rows, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    s_page, s_layer, s_kv, s_tok, s_head, _ = kv_pool.stride()
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _rope_store_kernel[(num_rows, num_heads + num_kv_heads)](
        qkv, q, cos, sin, meta, kv_pool, q_norm, k_norm, eps,
        meta.stride(0), cos.stride(0), s_page, layer * s_layer, s_kv, s_tok, s_head,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=kv_pool.shape[3], HALF_P=triton.next_power_of_2(head_dim // 2),
        DIM_P=triton.next_power_of_2(head_dim), QK_NORM=qk_norm is not None, num_warps=1,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    u = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * I] (gate first, as `model._mlp` splits it)."""
    num_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(num_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(num_rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, BLOCK=block)
    return out


@triton.jit
def _head_norm(x1, x2, norm_ptr, d, dmask, eps, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Per-head RMSNorm of heads [rows, halves] given as two halves, rounded as
    `model.rms_norm` (normalise, round, scale, round)."""
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)
    w1 = tl.load(norm_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(norm_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    x1 = (w1 * (x1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    x2 = (w2 * (x2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    return x1, x2


@triton.jit
def _rope_store_tokens_kernel(
    qkv_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kv_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_cos, stride_page, layer_offset, stride_kv, stride_tok, stride_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_P: tl.constexpr,
    KV_HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HALF_P: tl.constexpr, DIM_P: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    """One program per token, all its heads: rotate q into q_out, rotate k and store it with
    v in the token's KV slot (slot = page * PAGE_SIZE + offset in the page). With QK_NORM,
    each q and k head is RMS-normalised first."""
    t = tl.program_id(0).to(tl.int64)
    half = HEAD_DIM // 2
    src = qkv_ptr + t * (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_P)
    dmask = d < half
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, HEADS_P)
    q_mask = (hq < NUM_HEADS)[:, None] & dmask[None, :]
    q_src = src + hq[:, None] * HEAD_DIM + d[None, :]
    x1 = tl.load(q_src, mask=q_mask, other=0.0)
    x2 = tl.load(q_src + half, mask=q_mask, other=0.0)
    if QK_NORM:
        x1, x2 = _head_norm(x1, x2, q_norm_ptr, d, dmask, eps, HEAD_DIM // 2, HEAD_DIM)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    q_dst = q_out_ptr + (t * NUM_HEADS + hq)[:, None] * HEAD_DIM + d[None, :]
    tl.store(q_dst, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + half, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=q_mask)

    hk = tl.arange(0, KV_HEADS_P)
    k_mask = (hk < NUM_KV_HEADS)[:, None] & dmask[None, :]
    k_src = src + (NUM_HEADS + hk)[:, None] * HEAD_DIM + d[None, :]
    k1 = tl.load(k_src, mask=k_mask, other=0.0)
    k2 = tl.load(k_src + half, mask=k_mask, other=0.0)
    if QK_NORM:
        k1, k2 = _head_norm(k1, k2, k_norm_ptr, d, dmask, eps, HEAD_DIM // 2, HEAD_DIM)
    k1, k2 = k1.to(tl.float32), k2.to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = (
        kv_ptr + (slot // PAGE_SIZE) * stride_page + layer_offset
        + (slot % PAGE_SIZE) * stride_tok + hk * stride_head
    )  # fmt: skip
    k_dst = dst[:, None] + d[None, :]
    tl.store(k_dst, (k1 * c - k2 * s).to(kv_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + half, (k2 * c + k1 * s).to(kv_ptr.dtype.element_ty), mask=k_mask)
    dv = tl.arange(0, DIM_P)
    v_mask = (hk < NUM_KV_HEADS)[:, None] & (dv < HEAD_DIM)[None, :]
    v_src = src + (NUM_HEADS + NUM_KV_HEADS + hk)[:, None] * HEAD_DIM + dv[None, :]
    v = tl.load(v_src, mask=v_mask)
    tl.store(dst[:, None] + stride_kv + dv[None, :], v, mask=v_mask)


def rope_and_store_tokens(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Prefill's rope + store: for each token of qkv [T, (H + 2 KVH) * D] at positions[t],
    store rotated k and v at slots[t] (page * page_size + offset) of layer `layer` of
    kv_pool [N, L, 2, page, KVH, D]. Returns the rotated q [T, H, D]. qk_norm as in
    `rope_and_store_kv`."""
    num_tokens = qkv.shape[0]
    head_dim = kv_pool.shape[-1]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    s_page, s_layer, s_kv, s_tok, s_head, _ = kv_pool.stride()
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _rope_store_tokens_kernel[(num_tokens,)](
        qkv, q, cos, sin, positions, slots, kv_pool, q_norm, k_norm, eps,
        cos.stride(0), s_page, layer * s_layer, s_kv, s_tok, s_head,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_P=triton.next_power_of_2(num_heads), KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, PAGE_SIZE=kv_pool.shape[3],
        HALF_P=triton.next_power_of_2(head_dim // 2), DIM_P=triton.next_power_of_2(head_dim),
        QK_NORM=qk_norm is not None, num_warps=4,
    )  # fmt: skip
    return q
