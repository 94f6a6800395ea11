"""The "tiny-random" model: a small random-weight Llama plus a byte-level BPE tokenizer,
written as a Hugging Face directory so servers load it like any other model.

Weights come from a fixed seed and are scaled so logits are peaky: the greedy token wins by
a wide margin, so tests that compare tokens across processes and batch sizes are stable.
"""

from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import save_file

SEED = 0
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_TOKEN_ID = 2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}
# (name suffix, std): q/k larger so attention is far from uniform, lm_head large for peaky logits.
_STDS = {"q_proj": 0.2, "k_proj": 0.2, "v_proj": 0.125, "o_proj": 0.125, "mlp": 0.125}
_LM_HEAD_STD = 0.5

_WORDS = (
    "the a of and to in is was for on that with as by at from this it be are or an which "
    "model token page cache prefill decode server request batch queue router worker stream "
    "capital France Paris river mountain city country language number question answer time "
    "hello world what where when who how why one two three four five six seven eight nine ten"
).split()


def _corpus(num_lines: int = 3000) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for _ in range(num_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def build_tokenizer(out_dir: str) -> int:
    """Train a byte-level BPE on a fixed corpus, save it with a ChatML chat template;
    returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=CHATML_TEMPLATE,
        add_bos_token=False,
    )
    wrapped.save_pretrained(out_dir)
    return tok.get_vocab_size()


def _random_state_dict(cfg: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state = {"model.embed_tokens.weight": randn(cfg["vocab_size"], hidden, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {
            "q_proj": (q_out, hidden),
            "k_proj": (kv_out, hidden),
            "v_proj": (kv_out, hidden),
            "o_proj": (hidden, q_out),
        }
        for name, shape in shapes.items():
            state[f"{p}self_attn.{name}.weight"] = randn(*shape, std=_STDS[name])
        state[p + "mlp.gate_proj.weight"] = randn(inter, hidden, std=_STDS["mlp"])
        state[p + "mlp.up_proj.weight"] = randn(inter, hidden, std=_STDS["mlp"])
        state[p + "mlp.down_proj.weight"] = randn(hidden, inter, std=_STDS["mlp"])
        state[p + "input_layernorm.weight"] = 1 + randn(hidden, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1 + randn(hidden, std=0.1)
    state["model.norm.weight"] = 1 + randn(hidden, std=0.1)
    state["lm_head.weight"] = randn(cfg["vocab_size"], hidden, std=_LM_HEAD_STD)
    return state


def build_tiny_random(out_dir: str) -> None:
    """Write config, generation config, weights and tokenizer of tiny-random to out_dir."""
    vocab_size = build_tokenizer(out_dir)
    cfg = {**CONFIG, "vocab_size": vocab_size}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": EOS_TOKEN_ID, "bos_token_id": 1, "pad_token_id": 0}, f)
    save_file(
        _random_state_dict(cfg),
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
