"""Sparse MoE MLP on the GPU: a Triton grouped GEMM over the routed experts only, with shapes
fixed by the token count alone so a decode step stays graph-capturable. Worker process.

Routing is laid out on the device without a host sync: (token, slot) assignments are sorted
by expert and each expert's run padded to a multiple of BLOCK_M, so every BLOCK_M-row block
of the GEMM belongs to one expert. Blocks past the routed ones are skipped in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.gpu.kernels import silu_mul
from pdserve.engine.model_args import MoeArgs
from pdserve.engine.moe_weights import MoeWeights, route

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, scale_ptr,
    num_assignments, N, K, stride_a, stride_we, stride_wn, stride_out,
    NUM_EXPERTS: tl.constexpr, A_ROW_DIV: tl.constexpr, SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out[id] = a[id // A_ROW_DIV] @ w[expert].T (times scale[id]) for the BLOCK_M assignment
    ids of this block, all routed to `expert`; ids >= num_assignments are padding."""
    block = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(block_expert_ptr + block)
    ids = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < num_assignments  # a block past the routed ones holds only padding ids
    a_rows = (tl.where(valid, ids, 0) // A_ROW_DIV).to(tl.int64)
    n_mask = offs_n < N
    w_base = w_ptr + tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64) * stride_we
    k_end = tl.where(expert < NUM_EXPERTS, K, 0)  # a block past the routed ones does no work
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_a + offs_k[None, :],
            mask=valid[:, None] & k_mask[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
            mask=n_mask[None, :] & k_mask[:, None], other=0.0,
        )  # fmt: skip
        acc += tl.dot(a, w, input_precision=PRECISION)
    if SCALE_ROWS:
        scale = tl.load(scale_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    out_rows = tl.where(valid, ids, 0).to(tl.int64)
    tl.store(
        out_ptr + out_rows[:, None] * stride_out + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :],
    )  # fmt: skip


def block_m_for(num_assignments: int) -> int:
    """Rows per GEMM block: small for decode batches (little padding per expert), larger for
    prefill chunks (more reuse of each weight tile)."""
    return 16 if num_assignments <= 1024 else 64


def align_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P], block_expert [P // block_m]) for flat expert ids [M], no host sync.
    sorted_ids lists assignment ids grouped by expert, each group padded with M to a multiple
    of block_m; block_expert is each block's expert, num_experts for blocks past the end."""
    num_assignments = expert_ids.numel()
    flat = expert_ids.reshape(-1)
    # Rank of each assignment among those of its expert, in index order (a stable counting
    # sort: no sort kernel, no sync). [M, E] int32 is small: 16 MiB at M = 32768, E = 128.
    experts = torch.arange(num_experts, device=flat.device)
    seen = (flat[:, None] == experts[None, :]).to(torch.int32).cumsum(0, dtype=torch.int32)
    counts = seen[-1].to(torch.int64)
    rank = seen.gather(1, flat[:, None]).squeeze(1) - 1
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    dest = (padded_end - padded).gather(0, flat) + rank
    # At most min(E, M) experts are routed to, each padded by fewer than block_m rows.
    max_rows = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    num_blocks = triton.cdiv(max_rows, block_m)
    sorted_ids = torch.full(
        (num_blocks * block_m,), num_assignments, dtype=torch.int32, device=flat.device
    )
    assignment_ids = torch.arange(num_assignments, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, assignment_ids)
    block_starts = torch.arange(0, num_blocks * block_m, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_ids, block_expert


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_assignments: int,
    a_row_div: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[num_assignments, N]: row i = a[i // a_row_div] @ w[expert of i].T (* scale[i]),
    for w [E, N, K] and the layout from `align_by_expert`."""
    num_experts, n, k = w.shape
    block_m = sorted_ids.numel() // block_expert.numel()
    out = torch.empty(num_assignments, n, dtype=a.dtype, device=a.device)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    grid = (block_expert.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_ids, block_expert, scale if scale is not None else out,
        num_assignments, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        NUM_EXPERTS=num_experts, A_ROW_DIV=a_row_div, SCALE_ROWS=scale is not None,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=precision,
        num_warps=4,
    )  # fmt: skip
    return out


def fused_moe_mlp(x: torch.Tensor, weights: MoeWeights, moe: MoeArgs) -> torch.Tensor:
    """The sparse block for tokens x [T, hidden] with two grouped GEMMs; the same result as
    `moe.moe_mlp` up to summation order, and graph-capturable (no host sync)."""
    num_tokens = x.shape[0]
    top_weights, top_ids = route(x, weights.router, moe)
    num_assignments = num_tokens * moe.top_k
    sorted_ids, block_expert = align_by_expert(
        top_ids, weights.num_experts, block_m_for(num_assignments)
    )
    x = x.contiguous()
    gate_up = grouped_gemm(x, weights.gate_up, sorted_ids, block_expert, num_assignments, moe.top_k)
    act = silu_mul(gate_up)
    down = grouped_gemm(
        act, weights.down, sorted_ids, block_expert, num_assignments, 1,
        scale=top_weights.reshape(-1).contiguous(),
    )  # fmt: skip
    return down.view(num_tokens, moe.top_k, -1).sum(dim=1)
