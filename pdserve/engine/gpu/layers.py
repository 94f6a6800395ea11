"""The Llama layer stack with the fused Triton kernels, shared by the GPU decode step and
GPU prefill: they differ only in how attention reads and writes the KV pages. Worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.gpu.kernels import rms_norm, silu_mul
from pdserve.engine.gpu.moe import fused_moe_mlp
from pdserve.engine.model import LayerWeights, Linear, ModelArgs, ModelWeights

# (qkv [T, (H + 2 KVH) * D], layer index) -> attention output [T, H * D]; stores the new K/V.
Attend = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class LinearOps:
    """How the dense linear layers run: cuBLAS (`CUBLAS_OPS`), or the Triton GEMV in the
    decode graphs of few rows (`gemv.GEMV_OPS`)."""

    linear: Callable[[Linear, torch.Tensor], torch.Tensor]  # (layer, x [T, in]) -> [T, out]
    # (down, gate_up output [T, 2 * I]) -> down(silu(gate) * up)
    silu_mul_linear: Callable[[Linear, torch.Tensor], torch.Tensor]


CUBLAS_OPS = LinearOps(Linear.__call__, lambda down, gate_up: down(silu_mul(gate_up)))


def final_hidden(
    weights: ModelWeights,
    args: ModelArgs,
    token_ids: torch.Tensor,
    attend: Attend,
    ops: LinearOps = CUBLAS_OPS,
) -> torch.Tensor:
    """Final normalised hidden states [T, hidden]. The residual add is fused into each
    RMSNorm, and the last one of a layer is the next layer's input norm; MoE layers run the
    grouped-GEMM MLP. `ops` runs the dense linear layers."""
    residual = F.embedding(token_ids, weights.embed)
    eps = args.rms_norm_eps
    h = rms_norm(residual, weights.layers[0].input_norm, eps)
    for i, layer in enumerate(weights.layers):
        attn = attend(ops.linear(layer.qkv, h), i)
        h = rms_norm(ops.linear(layer.o, attn), layer.post_norm, eps, residual)
        mlp = _mlp(h, layer, args, ops)
        is_last = i + 1 == len(weights.layers)
        next_norm = weights.norm if is_last else weights.layers[i + 1].input_norm
        h = rms_norm(mlp, next_norm, eps, residual)
    return h


def qk_norm_of(layer: LayerWeights, eps: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Qwen3's per-head q/k RMSNorm weights for the rope kernels, None for other models."""
    if layer.q_norm is None or layer.k_norm is None:
        return None
    return layer.q_norm, layer.k_norm, eps


def _mlp(h: torch.Tensor, layer: LayerWeights, args: ModelArgs, ops: LinearOps) -> torch.Tensor:
    if layer.moe is not None and args.moe is not None:
        return fused_moe_mlp(h, layer.moe, args.moe)
    assert layer.gate_up is not None and layer.down is not None
    return ops.silu_mul_linear(layer.down, ops.linear(layer.gate_up, h))
