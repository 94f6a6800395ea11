"""Llama-family decoder as plain PyTorch functions (Llama, SmolLM2, Qwen2-style q/k/v bias,
Qwen3 q/k norm, Qwen3-MoE and Mixtral sparse MLPs). Runs in each worker. Weights come from
a Hugging Face state dict; q/k/v and gate/up are fused into one matrix each so a decode
step is a few large matmuls per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttnMeta, paged_attention
from pdserve.engine.model_args import SUPPORTED_MODEL_TYPES, ModelArgs
from pdserve.engine.moe import MoeWeights, moe_mlp, moe_weights_from_state_dict
from pdserve.engine.rope import apply_rope

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelArgs", "ModelWeights", "forward", "logits"]


@dataclass
class Linear:
    """y = x @ weight.T + bias. On the CPU a second copy of the weight may be prepacked for
    oneDNN: for inputs of several rows (decode batches, prefill chunks) its blocked layout
    runs 1.5-2.5x faster than the BLAS on the plain one, while a single row (batch-1 decode)
    is fastest as a plain GEMV. See `pack_for_cpu`."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None  # oneDNN layout of `weight`, for inputs of > 1 row

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def num_bytes(self) -> int:
        """Bytes one pass reads (one of the two layouts)."""
        tensors = [self.weight] if self.bias is None else [self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # [(H + 2 * KVH) * D, hidden]
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear | None  # [2 * intermediate, hidden]; None in a sparse layer
    down: Linear | None
    q_norm: torch.Tensor | None = None  # [head_dim], Qwen3
    k_norm: torch.Tensor | None = None
    moe: MoeWeights | None = None  # the sparse MLP that replaces gate_up/down

    def linears(self) -> list[Linear]:
        mlp = [] if self.gate_up is None or self.down is None else [self.gate_up, self.down]
        return [self.qkv, self.o, *mlp]

    def norms(self) -> list[torch.Tensor]:
        optional = [n for n in (self.q_norm, self.k_norm) if n is not None]
        return [self.input_norm, self.post_norm, *optional]


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear

    def linears(self) -> list[Linear]:
        return [*(linear for layer in self.layers for linear in layer.linears()), self.lm_head]

    def num_bytes(self, experts_read_per_layer: int | None = None) -> int:
        """Bytes of weights one decode step reads: every matrix once, the embedding table
        only as the lm_head (a step reads just a few of its rows as embeddings), and in a
        sparse layer the router and `experts_read_per_layer` experts (default: all)."""
        norms = [self.norm, *(n for layer in self.layers for n in layer.norms())]
        experts = sum(
            layer.moe.num_bytes(experts_read_per_layer) for layer in self.layers if layer.moe
        )
        return (
            sum(t.numel() * t.element_size() for t in norms)
            + sum(linear.num_bytes() for linear in self.linears())
            + experts
        )


def weights_from_state_dict(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    cpu_packed_weights: bool = False,
) -> ModelWeights:
    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(
                f"the checkpoint has no tensor {name!r}, which a {args.model_type} model with "
                "this config.json needs"
            )
        return state[name].to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in state else None

    layers = [_layer_weights(take, maybe, args, i) for i in range(args.num_layers)]
    embed = take("model.embed_tokens.weight")
    weights = ModelWeights(
        embed=embed,
        layers=layers,
        norm=take("model.norm.weight"),
        lm_head=Linear(_lm_head(args, embed, maybe)),
    )
    if device.type == "cpu":
        _store_wide_matrices_input_major(weights)
        if cpu_packed_weights:
            pack_for_cpu(weights)
    return weights


def _lm_head(
    args: ModelArgs,
    embed: torch.Tensor,
    maybe: Callable[[str], torch.Tensor | None],
) -> torch.Tensor:
    """The checkpoint's lm_head wherever it has one: transformers keeps one that differs from
    the embedding even under tie_word_embeddings. Without one, the embedding if tied."""
    lm_head = maybe("lm_head.weight")
    if lm_head is not None:
        return lm_head
    if not args.tie_word_embeddings:
        raise ValueError(
            "the checkpoint has no lm_head.weight and config.json does not set "
            "tie_word_embeddings: transformers would decode with a random lm_head"
        )
    return embed


def _dense_mlp(take: Callable[[str], torch.Tensor], mlp: str, bias: bool) -> tuple[Linear, Linear]:
    """(gate_up, down) of a dense MLP, gate rows first; biases only where the config has them."""

    def both(kind: str) -> torch.Tensor:
        return torch.cat([take(f"{mlp}gate_proj.{kind}"), take(f"{mlp}up_proj.{kind}")])

    gate_up = Linear(both("weight"), both("bias") if bias else None)
    down = Linear(take(mlp + "down_proj.weight"), take(mlp + "down_proj.bias") if bias else None)
    return gate_up, down


def _layer_weights(
    take: Callable[[str], torch.Tensor],
    maybe: Callable[[str], torch.Tensor | None],
    args: ModelArgs,
    i: int,
) -> LayerWeights:
    p = f"model.layers.{i}."
    attn = p + "self_attn."
    moe: MoeWeights | None = None
    gate_up: Linear | None = None
    down: Linear | None = None
    if args.moe is not None and args.is_moe_layer(i):
        moe = moe_weights_from_state_dict(take, maybe, p, args.model_type, args.moe.num_experts)
    else:
        gate_up, down = _dense_mlp(take, p + "mlp.", args.mlp_bias)
    return LayerWeights(
        input_norm=take(p + "input_layernorm.weight"),
        qkv=Linear(
            torch.cat([take(f"{attn}{n}_proj.weight") for n in "qkv"]),
            torch.cat([take(f"{attn}{n}_proj.bias") for n in "qkv"]) if args.qkv_bias else None,
        ),
        o=Linear(take(attn + "o_proj.weight"), take(attn + "o_proj.bias") if args.o_bias else None),
        post_norm=take(p + "post_attention_layernorm.weight"),
        gate_up=gate_up,
        down=down,
        q_norm=take(attn + "q_norm.weight") if args.qk_norm else None,
        k_norm=take(attn + "k_norm.weight") if args.qk_norm else None,
        moe=moe,
    )


def _input_major(matrix: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, its memory laid out [in, out] (a transposed view)."""
    return matrix.t().contiguous().t()


def _store_wide_matrices_input_major(weights: ModelWeights) -> None:
    """On the CPU a batch-1 matmul is a GEMV bound by how fast one core streams the weights.
    With short rows (in < out: q/k/v, gate/up, lm_head) the BLAS streams an [in, out] layout
    about 1.7x faster than HF's [out, in] one. The tensors keep their [out, in] shape, so
    every caller is unchanged. The embedding is re-laid out too when the lm_head shares it
    (a row lookup from it stays cheap)."""
    for linear in weights.linears():
        if linear.weight.shape[0] > linear.weight.shape[1]:
            shared = linear.weight is weights.embed
            linear.weight = _input_major(linear.weight)
            if shared:
                weights.embed = linear.weight


# Rows of input oneDNN is told to expect when it picks the packed layout; measured on a
# 2-core AVX-512 host: packing for 64 rows serves 2 to 512 rows best.
_PACK_FOR_ROWS = 64


def pack_for_cpu(weights: ModelWeights) -> None:
    """Add a oneDNN-prepacked copy of every float32 matrix (2x the weight memory) for
    multi-row inputs. A no-op where PyTorch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return
    for linear in weights.linears():
        if linear.weight.dtype == torch.float32:
            plain = linear.weight.contiguous()
            linear.packed = torch.ops.mkldnn._reorder_linear_weight(plain, _PACK_FOR_ROWS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _attention(
    x: torch.Tensor,
    layer: LayerWeights,
    args: ModelArgs,
    kv_layer: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: AttnMeta,
) -> torch.Tensor:
    num_tokens, heads, kv_heads = x.shape[0], args.num_heads, args.num_kv_heads
    qkv = layer.qkv(x).view(num_tokens, heads + 2 * kv_heads, args.head_dim)
    qk = qkv[:, : heads + kv_heads]
    if layer.q_norm is not None and layer.k_norm is not None:
        qk = qk_norm(qk, layer.q_norm, layer.k_norm, heads, args.rms_norm_eps)
    # q and k sit side by side: one rope call turns both
    qk = apply_rope(qk, cos, sin)
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
    out = paged_attention(q, k, v, kv_layer, meta)
    return layer.o(out)


def qk_norm(
    qk: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """Per-head RMSNorm of q heads and k heads, qk [T, H + KVH, D] (Qwen3)."""
    q = rms_norm(qk[:, :num_heads], q_norm, eps)
    k = rms_norm(qk[:, num_heads:], k_norm, eps)
    return torch.cat([q, k], dim=1)


def _mlp(x: torch.Tensor, layer: LayerWeights, args: ModelArgs) -> torch.Tensor:
    if layer.moe is not None and args.moe is not None:
        return moe_mlp(x, layer.moe, args.moe)
    assert layer.gate_up is not None and layer.down is not None
    gate, up = layer.gate_up(x).chunk(2, dim=-1)
    return layer.down(F.silu(gate) * up)


def forward(
    weights: ModelWeights,
    args: ModelArgs,
    token_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_pool: torch.Tensor,
    meta: AttnMeta,
) -> torch.Tensor:
    """Final hidden states [T, hidden] for a ragged batch of T new tokens; writes their KV.
    cos/sin: [T, head_dim] rows of the rope tables at the tokens' positions;
    kv_pool: [num_pages, num_layers, 2, page_size, KVH, D]."""
    x = F.embedding(token_ids, weights.embed)
    for i, layer in enumerate(weights.layers):
        h = rms_norm(x, layer.input_norm, args.rms_norm_eps)
        x = x + _attention(h, layer, args, kv_pool[:, i], cos, sin, meta)
        h = rms_norm(x, layer.post_norm, args.rms_norm_eps)
        x = x + _mlp(h, layer, args)
    return rms_norm(x, weights.norm, args.rms_norm_eps)


def logits(weights: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [R, vocab] for the selected rows of final hidden states."""
    return weights.lm_head(hidden).float()
