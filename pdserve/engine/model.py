"""Llama-family decoder as plain PyTorch functions (Llama, SmolLM2, Qwen2-style q/k/v bias).

Runs in each worker. Weights come from a Hugging Face state dict; q/k/v and gate/up are
fused into one matrix each so a decode step is a few large matmuls per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttnMeta, paged_attention
from pdserve.engine.rope import apply_rope, rope_params_from_hf

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type != "llama" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        num_heads = cfg["num_attention_heads"]
        theta, scaling = rope_params_from_hf(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 * KVH) * D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor

    def num_bytes(self) -> int:
        """Bytes of weights one decode step reads: every matrix once, the embedding table
        only as the lm_head (a step reads just a few of its rows as embeddings)."""
        tensors = [self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def weights_from_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
    def take(name: str) -> torch.Tensor:
        return state[name].to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in state else None

    layers = []
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        biases = [maybe(f"{attn}{n}_proj.bias") for n in "qkv"]
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([take(f"{attn}{n}_proj.weight") for n in "qkv"]),
                qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                o=take(attn + "o_proj.weight"),
                o_bias=maybe(attn + "o_proj.bias"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat(
                    [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
                ),
                down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = embed if args.tie_word_embeddings or "lm_head.weight" not in state else None
    return ModelWeights(
        embed=embed,
        layers=layers,
        norm=take("model.norm.weight"),
        lm_head=lm_head if lm_head is not None else take("lm_head.weight"),
    )


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
    num_tokens = x.shape[0]
    q_size = args.num_heads * args.head_dim
    kv_size = args.num_kv_heads * args.head_dim
    qkv = F.linear(x, layer.qkv, layer.qkv_bias)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = apply_rope(q.view(num_tokens, args.num_heads, args.head_dim), cos, sin)
    k = apply_rope(k.view(num_tokens, args.num_kv_heads, args.head_dim), cos, sin)
    v = v.reshape(num_tokens, args.num_kv_heads, args.head_dim)
    out = paged_attention(q, k, v, kv_layer, meta)
    return F.linear(out, layer.o, layer.o_bias)


def _mlp(x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, layer.down)


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
        x = x + _mlp(h, layer)
    return rms_norm(x, weights.norm, args.rms_norm_eps)


def logits(weights: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [R, vocab] for the selected rows of final hidden states."""
    return F.linear(hidden, weights.lm_head).float()
