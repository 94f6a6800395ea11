"""Fixtures for engine tests: random-weight transformers models saved as HF directories,
and engines built on them (or on tiny-random)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from tests.engine.families import BUILDERS as FAMILY_BUILDERS

VOCAB = 300

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.3,  # large: peaky logits, so greedy choices have wide margins
    bos_token_id=1,
    eos_token_id=2,
)

ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_LINEAR = {"rope_type": "linear", "factor": 4.0}


def _save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def build_llama(path, rope_scaling: dict) -> str:
    """GQA, untied embeddings, scaled rope."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **_COMMON, rope_theta=5000.0, rope_scaling=rope_scaling, tie_word_embeddings=False
    )
    return _save(LlamaForCausalLM(cfg), path)


def build_qwen2(path) -> str:
    """q/k/v bias, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**_COMMON, tie_word_embeddings=True))
    with torch.no_grad():  # biases start at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return _save(model, path)


@pytest.fixture(
    scope="session", params=["llama3-rope", "linear-rope", "qwen2-bias", *FAMILY_BUILDERS]
)
def ref_model_dir(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(request.param)
    if request.param in FAMILY_BUILDERS:
        return FAMILY_BUILDERS[request.param](path)
    if request.param == "qwen2-bias":
        return build_qwen2(path)
    return build_llama(path, ROPE_LLAMA3 if request.param == "llama3-rope" else ROPE_LINEAR)


def make_engine(model_path: str, **overrides) -> Engine:
    cfg = dict(model_path=model_path, page_size=16, chunked_prefill_size=64, context_length=1024)
    cfg.update(overrides)
    return Engine.from_config(EngineConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_engine_factory():
    return lambda **kw: make_engine("tiny-random", **kw)
