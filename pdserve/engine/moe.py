"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral) in plain PyTorch; worker process.

Tokens are routed, sorted by expert, and each expert that received any runs one SwiGLU on
its contiguous slice: only routed experts are computed, never all of them densely. CUDA
devices take the grouped Triton kernel of `engine/gpu/moe.py` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.model_args import MoeArgs


@dataclass
class MoeWeights:
    router: torch.Tensor  # [E, hidden]
    gate_up: torch.Tensor  # [E, 2 * I, hidden], gate rows first
    down: torch.Tensor  # [E, hidden, I]

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def expert_num_bytes(self) -> int:
        """Bytes of one expert's matrices."""
        per_expert = self.gate_up[0].numel() + self.down[0].numel()
        return per_expert * self.gate_up.element_size()

    def num_bytes(self, num_experts_read: int | None = None) -> int:
        """Bytes a pass reads: the router and `num_experts_read` experts (default all)."""
        experts = self.num_experts if num_experts_read is None else num_experts_read
        router = self.router.numel() * self.router.element_size()
        return router + experts * self.expert_num_bytes()


def moe_weights_from_state_dict(
    take: Callable[[str], torch.Tensor],
    maybe: Callable[[str], torch.Tensor | None],
    prefix: str,
    model_type: str,
    num_experts: int,
) -> MoeWeights:
    """The layer's experts stacked; `take(name)` returns a tensor on the target device,
    `maybe(name)` None when absent. Checkpoints hold one matrix per expert; a transformers 5
    model in memory already holds them stacked (then shared, not copied)."""
    stacked_gate_up = maybe(prefix + "mlp.experts.gate_up_proj")
    if stacked_gate_up is not None:
        return MoeWeights(
            router=take(prefix + "mlp.gate.weight"),
            gate_up=stacked_gate_up,
            down=take(prefix + "mlp.experts.down_proj"),
        )
    if model_type == "mixtral":  # w1 = gate, w3 = up, w2 = down
        block, names = prefix + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        block, names = prefix + "mlp.", ("gate_proj", "up_proj", "down_proj")
    gate, up, down = names

    def expert(e: int, name: str) -> torch.Tensor:
        return take(f"{block}experts.{e}.{name}.weight")

    return MoeWeights(
        router=take(block + "gate.weight"),
        gate_up=torch.stack(
            [torch.cat([expert(e, gate), expert(e, up)]) for e in range(num_experts)]
        ),
        down=torch.stack([expert(e, down) for e in range(num_experts)]),
    )


def route(x: torch.Tensor, router: torch.Tensor, moe: MoeArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in x's dtype, expert ids [T, k]) as transformers computes them: a
    float32 softmax over all experts, the top k, renormalised where the family does."""
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    top_probs, top_ids = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return top_probs.to(x.dtype), top_ids


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
