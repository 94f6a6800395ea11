"""Random-weight Qwen3, Qwen3-MoE and Mixtral models built with transformers and saved as
Hugging Face directories (safetensors), for the engine's reference and serving tests."""

from __future__ import annotations

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


def build_qwen3(path) -> str:
    """q/k norm, tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    return _save(Qwen3ForCausalLM(Qwen3Config(**_SHAPE, tie_word_embeddings=True)), path)


def build_qwen3_moe(path, norm_topk_prob: bool = False) -> str:
    """8 experts top-2; three layers, the middle one a plain MLP (mlp_only_layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3MoeConfig(
        **{**_SHAPE, "num_hidden_layers": 3},
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    return _save(Qwen3MoeForCausalLM(cfg), path)


def build_mixtral(path) -> str:
    """8 experts top-2, renormalised top-k weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(4)
    cfg = MixtralConfig(
        **{**_SHAPE, "intermediate_size": 48}, num_local_experts=8, num_experts_per_tok=2
    )
    return _save(MixtralForCausalLM(cfg), path)


BUILDERS = {"qwen3": build_qwen3, "qwen3-moe": build_qwen3_moe, "mixtral": build_mixtral}
