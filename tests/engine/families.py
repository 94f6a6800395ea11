"""Random-weight Qwen3, Qwen3-MoE, Mixtral and an odd-shaped Llama built with transformers and
saved as Hugging Face directories (safetensors), for the engine's reference and serving tests."""

from __future__ import annotations

import json
import os

import torch

_SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=0.3,  # large: peaky logits, so greedy choices have wide margins
    bos_token_id=1,
    eos_token_id=2,
)


def _randomise_norms(model) -> None:
    """Norm weights start at one; make every RMSNorm (q/k norms included) matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)


def _save(model, path) -> str:
    _randomise_norms(model)
    model.save_pretrained(path)
    return str(path)


def build_qwen3(path, **overrides) -> str:
    """q/k norm, tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen3Config(**{**_SHAPE, **overrides}, tie_word_embeddings=True)
    return _save(Qwen3ForCausalLM(cfg), path)


def build_qwen3_moe(path, norm_topk_prob: bool = False, **overrides) -> str:
    """8 experts top-2; three layers, the middle one a plain MLP (mlp_only_layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3MoeConfig(
        **{**_SHAPE, "num_hidden_layers": 3, **overrides},
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    return _save(Qwen3MoeForCausalLM(cfg), path)


def build_mixtral(path, **overrides) -> str:
    """8 experts top-2, renormalised top-k weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(4)
    cfg = MixtralConfig(
        **{**_SHAPE, "intermediate_size": 48, **overrides},
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    return _save(MixtralForCausalLM(cfg), path)


def build_llama_odd_heads(path, **overrides) -> str:
    """head_dim 24 (not hidden / heads = 16), one KV head for 4 query heads, three layers and
    an intermediate size that is no multiple of 8: a KV page shape no other model has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    shape = {**_SHAPE, "num_key_value_heads": 1, "head_dim": 24, "num_hidden_layers": 3}
    cfg = LlamaConfig(**{**shape, "intermediate_size": 100, **overrides}, tie_word_embeddings=False)
    return _save(LlamaForCausalLM(cfg), path)


BUILDERS = {
    "qwen3": build_qwen3,
    "qwen3-moe": build_qwen3_moe,
    "mixtral": build_mixtral,
    "llama-odd-heads": build_llama_odd_heads,
}


def build_served(path, family: str, **kwargs) -> str:
    """A model a server can load: tiny-random's tokenizer, the family's weights sized to it."""
    from pdserve.engine.tiny_random import EOS_TOKEN_ID, build_tokenizer

    vocab_size = build_tokenizer(str(path))
    model_dir = BUILDERS[family](path, vocab_size=vocab_size, eos_token_id=EOS_TOKEN_ID, **kwargs)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": EOS_TOKEN_ID, "bos_token_id": 1, "pad_token_id": 0}, f)
    return model_dir
