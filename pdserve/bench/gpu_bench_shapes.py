"""Model shapes of the decode benchmark (random weights): dense Llama-3 shapes, a Qwen3-MoE
shape with Qwen3-30B-A3B's dimensions on fewer layers, and tiny ones for a CPU smoke run.
Runs in the benchmark process."""

from __future__ import annotations

from typing import Any

import torch

_LLAMA3 = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
# Dense Llama shapes (also used by gpu_e2e, which builds them as LlamaForCausalLM).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}
_QWEN3_30B_A3B = dict(
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# Qwen3-30B-A3B has 48 layers (61 GB in bf16): half of them leave room on one 80 GB GPU for
# transformers' copy of the weights being shared, both KV caches and activations.
MOE_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b-24l": dict(_QWEN3_30B_A3B, num_hidden_layers=24),
}
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", vocab_size=2000, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "tiny-moe": dict(
        _QWEN3_30B_A3B, vocab_size=2000, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1,
        eos_token_id=2,
    ),
}  # fmt: skip
ALL_SHAPES = {**SHAPES, **MOE_SHAPES, **TINY_SHAPES}


def build_hf_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """A random-weight transformers model of `shape`, built directly on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model.eval()
