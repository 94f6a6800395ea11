"""The Llama layer stack with the fused Triton kernels, shared by the GPU decode step and
GPU prefill: they differ only in how attention reads and writes the KV pages. Worker process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine.gpu.kernels import rms_norm, silu_mul
from pdserve.engine.gpu.moe import fused_moe_mlp
from pdserve.engine.model import LayerWeights, Linear, ModelArgs, ModelWeights

# (qkv [T, (H + 2 KVH) * D], layer index) -> attention output [T, H * D]; stores the new K/V.
Attend = Callable[[torch.Tensor, int], torch.Tensor]
# (dense linear layer, input [T, in]) -> output [T, out]: the layer's own call (cuBLAS), or
# the Triton GEMV in decode graphs of few rows (`gemv.gemv_linear`).
ApplyLinear = Callable[[Linear, torch.Tensor], torch.Tensor]


def call_linear(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x)


def final_hidden(
    weights: ModelWeights,
    args: ModelArgs,
    token_ids: torch.Tensor,
    attend: Attend,
    apply: ApplyLinear = call_linear,
) -> torch.Tensor:
    """Final normalised hidden states [T, hidden]. The residual add is fused into each
    RMSNorm, and the last one of a layer is the next layer's input norm; MoE layers run the
    grouped-GEMM MLP. `apply` runs the dense linear layers."""
    residual = F.embedding(token_ids, weights.embed)
    eps = args.rms_norm_eps
    h = rms_norm(residual, weights.layers[0].input_norm, eps)
    for i, layer in enumerate(weights.layers):
        attn = attend(apply(layer.qkv, h), i)
        h = rms_norm(apply(layer.o, attn), layer.post_norm, eps, residual)
        mlp = _mlp(h, layer, args, apply)
        is_last = i + 1 == len(weights.layers)
        next_norm = weights.norm if is_last else weights.layers[i + 1].input_norm
        h = rms_norm(mlp, next_norm, eps, residual)
    return h


def qk_norm_of(layer: LayerWeights, eps: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Qwen3's per-head q/k RMSNorm weights for the rope kernels, None for other models."""
    if layer.q_norm is None or layer.k_norm is None:
        return None
    return layer.q_norm, layer.k_norm, eps


def _mlp(h: torch.Tensor, layer: LayerWeights, args: ModelArgs, apply: ApplyLinear) -> torch.Tensor:
    if layer.moe is not None and args.moe is not None:
        return fused_moe_mlp(h, layer.moe, args.moe)
    assert layer.gate_up is not None and layer.down is not None
    return apply(layer.down, silu_mul(apply(layer.gate_up, h)))
