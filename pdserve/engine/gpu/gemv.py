"""A Triton GEMV for the decode step's linear layers at 1 to 4 rows: y = x @ W^T (+ bias),
split along K so that even the small matrices keep the whole GPU reading, each split's
partial sums reduced by the split that finishes last (no second kernel). Worker process
(GPU only; the CPU runs it under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.engine.gpu.layers import LinearOps
from pdserve.engine.model import Linear

MAX_GEMV_ROWS = 4
ROW_BYTES_PER_STEP = 512  # bytes of one weight row a program reads per loop step
BLOCK_N = 16  # weight rows per program: a step reads 16 x 512 B = 8 KiB in 16 B vectors
PROGRAMS_PER_SM = 8  # splits are added until the grid has about this many programs per SM
MAX_SPLIT_K = 16  # the reducing program's loads of every split are unrolled


@triton.jit
def _x_row(
    x_ptr, row: tl.constexpr, k, k_mask, M, K, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr
):  # fmt: skip
    """Row `row` of the input at columns k in fp32; zeros for rows past M (padding up to
    M_P). With SILU_MUL the input row is [gate | up] (2K wide) and the row is
    silu(gate) * up, rounded to the activation dtype where `kernels.silu_mul` rounds."""
    row_ok = tl.full((BLOCK_K,), row, tl.int32) < M
    src = x_ptr + row * (2 * K if SILU_MUL else K) + k
    x = tl.load(src, mask=k_mask & row_ok, other=0.0)
    if SILU_MUL:
        up = tl.load(src + K, mask=k_mask & row_ok, other=0.0).to(tl.float32)
        gate = x.to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(x.dtype).to(tl.float32)
        x = (act * up).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr, M, N, K, k_per_split,
    stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """Program (n block, split) sums rows [M_P] x W[BLOCK_N, its K slice] in fp32. With
    SPLIT_K > 1 it stores the partial sums, and the last split of the n block to arrive
    (counted atomically) adds all splits in split order and writes y, rounded once.

    Each row of x has its own [BLOCK_N, BLOCK_K] accumulator of products, summed along K
    only after the loop: the loop body is loads and FMAs, no cross-thread reduction."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, M_P)
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + ks
        k_mask = k < k_end
        # Each weight byte is read once per call: no need to keep it in L2.
        w = tl.load(
            w_rows + k[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)  # fmt: skip
        acc0 += w * _x_row(x_ptr, 0, k, k_mask, M, K, BLOCK_K, SILU_MUL)[None, :]
        if M_P > 1:
            acc1 += w * _x_row(x_ptr, 1, k, k_mask, M, K, BLOCK_K, SILU_MUL)[None, :]
        if M_P > 2:
            acc2 += w * _x_row(x_ptr, 2, k, k_mask, M, K, BLOCK_K, SILU_MUL)[None, :]
            acc3 += w * _x_row(x_ptr, 3, k, k_mask, M, K, BLOCK_K, SILU_MUL)[None, :]
    # [BLOCK_N, M_P]: column r holds row r's sums
    acc = tl.where(m[None, :] == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if M_P > 1:
        acc += tl.where(m[None, :] == 1, tl.sum(acc1, axis=1)[:, None], 0.0)
    if M_P > 2:
        acc += tl.where(m[None, :] == 2, tl.sum(acc2, axis=1)[:, None], 0.0)
        acc += tl.where(m[None, :] == 3, tl.sum(acc3, axis=1)[:, None], 0.0)
    out_mask = n_mask[:, None] & (m < M)[None, :]
    if SPLIT_K > 1:
        partial = partial_ptr + (split * M_P + m)[None, :] * N + n[:, None]
        tl.store(partial, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are stored before the count releases them
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_N, M_P), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # unrolled: all splits' loads in flight at once
                part = partial_ptr + (s * M_P + m)[None, :] * N + n[:, None]
                acc += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_rows(acc, bias_ptr, out_ptr, n, m, N, out_mask, HAS_BIAS)
            tl.store(count_ptr + pid_n, 0)  # ready for the next call (or graph replay)
    else:
        _store_rows(acc, bias_ptr, out_ptr, n, m, N, out_mask, HAS_BIAS)


@triton.jit
def _store_rows(acc, bias_ptr, out_ptr, n, m, N, out_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + m[None, :] * N + n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class GemvPlan:
    block_k: int
    split_k: int
    k_per_split: int  # a multiple of block_k


def plan_gemv(
    n: int, k: int, elem_bytes: int, num_sms: int, split_k: int | None = None
) -> GemvPlan:
    """Block sizes for an [n, k] weight: 512 B of each of 16 rows per loop step, and K split
    until about PROGRAMS_PER_SM programs per SM are in flight (the n blocks alone are enough
    for wide matrices like gate_up or lm_head, which then run unsplit)."""
    block_k = min(ROW_BYTES_PER_STEP // elem_bytes, triton.next_power_of_2(k))
    steps = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = PROGRAMS_PER_SM * num_sms // triton.cdiv(n, BLOCK_N)
    split_k = max(1, min(split_k, steps, MAX_SPLIT_K))
    steps_per_split = triton.cdiv(steps, split_k)
    # no empty split: each one reads at least one step
    return GemvPlan(block_k, triton.cdiv(steps, steps_per_split), steps_per_split * block_k)


_num_sms: dict[torch.device, int] = {}
# (device, rows, n, split_k) -> (partial sums [split_k, rows, n] fp32, arrival counts [n blocks])
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _sm_count(device: torch.device) -> int:
    if device not in _num_sms:
        is_cuda = device.type == "cuda"
        _num_sms[device] = (
            torch.cuda.get_device_properties(device).multi_processor_count if is_cuda else 4
        )
    return _num_sms[device]


def _workspace(
    device: torch.device, rows: int, n: int, split_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocated on the first call for a shape and reused, so a CUDA graph captures fixed
    addresses; the counts start at zero and the reducing program puts them back to zero.
    Calls of one shape must run one after another (one stream, as the decode graphs do)."""
    key = (device, rows, n, split_k)
    if key not in _workspaces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"gemv workspace for {key} missing: call once before capturing")
        partial = torch.empty(split_k, rows, n, dtype=torch.float32, device=device)
        counts = torch.zeros(triton.cdiv(n, BLOCK_N), dtype=torch.int32, device=device)
        _workspaces[key] = (partial, counts)
    return _workspaces[key]


def _num_warps(m_p: int) -> int:
    """Threads enough that the m_p [16, 256] fp32 accumulators (bf16) take at most 64
    registers a thread, leaving room for several programs per SM (their loads in flight)."""
    return 4 if m_p == 1 else 8


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    silu_mul_input: bool = False, split_k: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [M <= 4, K] @ weight[N, K]^T (+ bias [N]) in fp32, rounded once to x's dtype, as
    F.linear. With `silu_mul_input`, x is a gate_up output [M, 2K] and the input is
    silu(gate) * up, computed on the fly (the MLP's down projection without its own SiLU·mul
    kernel). `split_k` overrides the plan's split (tests). Loads are vectorised where the
    weight is row-major (stride 1 along K, as on the GPU; Triton specialises a stride of 1)."""
    rows = x.shape[0]
    n, k = weight.shape
    assert 1 <= rows <= MAX_GEMV_ROWS and x.shape[1] == (2 * k if silu_mul_input else k)
    x = x.contiguous()
    plan = plan_gemv(n, k, weight.element_size(), _sm_count(x.device), split_k)
    m_p = triton.next_power_of_2(rows)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial, counts = _workspace(x.device, m_p, n, plan.split_k) if plan.split_k > 1 else (out, out)
    grid = (triton.cdiv(n, BLOCK_N), plan.split_k)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, out, partial, counts,
        rows, n, k, plan.k_per_split, *weight.stride(),
        HAS_BIAS=bias is not None, M_P=m_p, BLOCK_N=BLOCK_N, BLOCK_K=plan.block_k,
        SPLIT_K=plan.split_k, SILU_MUL=silu_mul_input, num_warps=_num_warps(m_p),
    )  # fmt: skip
    return out


def _gemv_linear(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    return gemv(x, linear.weight, linear.bias)


def _gemv_silu_mul_linear(linear: Linear, gate_up: torch.Tensor) -> torch.Tensor:
    return gemv(gate_up, linear.weight, linear.bias, silu_mul_input=True)


# The dense linear layers of decode steps of few rows (`--decode-gemv on`).
GEMV_OPS = LinearOps(_gemv_linear, _gemv_silu_mul_linear)
