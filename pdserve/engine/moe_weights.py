"""Mixture-of-experts weights (experts stacked per layer) and the router's top-k choice,
shared by the PyTorch path (`engine/moe.py`) and the Triton path (`engine/gpu/moe.py`)."""

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
