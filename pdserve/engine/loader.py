"""Model loading: resolve a model name to a Hugging Face directory, read its config and
safetensors weights, and fingerprint them. Runs in each worker; the front end only resolves
the directory, with `model_dir.py` (no torch)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from pdserve.engine.model import ModelArgs, ModelWeights, weights_from_state_dict
from pdserve.engine.model_dir import BUILTIN_MODELS as BUILTIN_MODELS  # re-exported
from pdserve.engine.model_dir import resolve_model_dir


@dataclass
class LoadedModel:
    model_dir: str
    args: ModelArgs
    weights: ModelWeights
    eos_token_ids: frozenset[int]
    fingerprint: str


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def eos_ids(model_dir: str, config: dict[str, Any]) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json together."""
    generation = _read_json(os.path.join(model_dir, "generation_config.json"))
    return frozenset(_as_ids(config.get("eos_token_id")) | _as_ids(generation.get("eos_token_id")))


def read_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def check_shapes(state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Refuse, naming the tensor, weights whose shape the config's heads, head_dim, hidden
    and vocab sizes do not give (transformers refuses them too); else the first step fails."""
    q_rows, kv_rows = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hidden = args.hidden_size
    expected = {
        "model.embed_tokens.weight": (args.vocab_size, hidden),
        "lm_head.weight": (args.vocab_size, hidden),
    }
    for i in range(args.num_layers):
        attn = f"model.layers.{i}.self_attn."
        expected[attn + "q_proj.weight"] = (q_rows, hidden)
        expected[attn + "k_proj.weight"] = (kv_rows, hidden)
        expected[attn + "v_proj.weight"] = (kv_rows, hidden)
        expected[attn + "o_proj.weight"] = (hidden, q_rows)
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(state[name].shape)} where config.json gives {shape} "
                f"(vocab_size={args.vocab_size}, hidden_size={hidden}, "
                f"num_attention_heads={args.num_heads}, "
                f"num_key_value_heads={args.num_kv_heads}, head_dim={args.head_dim})"
            )


def fingerprint(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """Equal for two processes that load the same weights: the architecture fields of the
    config, every tensor's name/shape/dtype, and a strided sample sum of its values."""
    args = ModelArgs.from_hf_config(config)
    digest = hashlib.sha256(json.dumps(vars(args), sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name]
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].double().sum().item()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{sample!r};".encode())
    return digest.hexdigest()[:16]


def load_model(
    model_path: str, dtype: torch.dtype, device: torch.device, cpu_packed_weights: bool = False
) -> LoadedModel:
    model_dir = resolve_model_dir(model_path)
    config = _read_json(os.path.join(model_dir, "config.json"))
    args = ModelArgs.from_hf_config(config)
    state = read_state_dict(model_dir)
    check_shapes(state, args)
    return LoadedModel(
        model_dir=model_dir,
        args=args,
        weights=weights_from_state_dict(state, args, dtype, device, cpu_packed_weights),
        eos_token_ids=eos_ids(model_dir, config),
        fingerprint=fingerprint(config, state),
    )
