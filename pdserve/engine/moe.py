"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral) in plain PyTorch; worker process.

Tokens are routed, sorted by expert, and each expert that received any runs one SwiGLU on
its contiguous slice: only routed experts are computed, never all of them densely. CUDA
devices take the grouped Triton kernel of `engine/gpu/moe.py` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.model_args import MoeArgs
from pdserve.engine.moe_weights import MoeWeights, moe_weights_from_state_dict, route

__all__ = ["MoeWeights", "moe_mlp", "moe_mlp_torch", "moe_weights_from_state_dict", "route"]


def moe_mlp(x: torch.Tensor, weights: MoeWeights, moe: MoeArgs) -> torch.Tensor:
    """[T, hidden] output of the sparse block for tokens x [T, hidden]. On a CUDA device the
    Triton grouped GEMM of `engine/gpu/moe.py` runs instead (no host sync)."""
    if x.is_cuda:
        from pdserve.engine.gpu.moe import fused_moe_mlp

        return fused_moe_mlp(x, weights, moe)
    return moe_mlp_torch(x, weights, moe)


def moe_mlp_torch(x: torch.Tensor, weights: MoeWeights, moe: MoeArgs) -> torch.Tensor:
    """The sparse block in plain PyTorch: one SwiGLU per routed expert on its slice."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    top_weights, top_ids = route(x, weights.router, moe)
    flat_ids = top_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    token_rows = order // moe.top_k
    counts = torch.bincount(flat_ids, minlength=weights.num_experts).tolist()
    rows = x[token_rows]
    outs = []
    start = 0
    for expert, count in enumerate(counts):
        if count:
            outs.append(_expert(rows[start : start + count], weights, expert))
            start += count
    expert_out = torch.cat(outs) * top_weights.reshape(-1)[order].unsqueeze(1)
    # accumulate in x's dtype, expert by expert, as transformers' index_add_ does
    return torch.zeros_like(x).index_add_(0, token_rows, expert_out)


def _expert(x: torch.Tensor, weights: MoeWeights, expert: int) -> torch.Tensor:
    gate, up = F.linear(x, weights.gate_up[expert]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weights.down[expert])
