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
from pdserve.engine.model_dir import read_config, resolve_model_dir


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


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files transformers would load: model.safetensors, else the shards
    model.safetensors.index.json names (not other *.safetensors beside them, such as the
    Mistral-format consolidated.safetensors that repeats every weight), else every
    *.safetensors of the directory."""
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        names = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
        files = [os.path.join(model_dir, name) for name in names]
        missing = [
            name for name, path in zip(names, files, strict=True) if not os.path.isfile(path)
        ]
        if missing or not files:
            what = f"shards that are missing: {missing}" if missing else "no shards"
            raise FileNotFoundError(f"{INDEX_FILE} in {model_dir} names {what}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        others = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = (
            f" (found {sorted(others)}: only safetensors checkpoints are loaded)" if others else ""
        )
        raise FileNotFoundError(f"no *.safetensors in {model_dir}{hint}")
    return files


def read_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        state.update(load_file(path))
    return state


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape config.json gives every tensor the engine may take, by checkpoint name."""
    q_rows, kv_rows = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hidden, inter = args.hidden_size, args.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, hidden),
        "lm_head.weight": (args.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        for name, rows, cols in (("q", q_rows, hidden), ("k", kv_rows, hidden),
                                 ("v", kv_rows, hidden), ("o", hidden, q_rows)):  # fmt: skip
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, cols)
            shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        for name in ("q_norm", "k_norm"):
            shapes[f"{p}self_attn.{name}.weight"] = (args.head_dim,)
        for name in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}{name}.weight"] = (hidden,)
        if args.moe is not None and args.is_moe_layer(i):
            shapes.update(_expert_shapes(p, args))
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
            shapes[p + "mlp.gate_proj.bias"] = (inter,)
            shapes[p + "mlp.up_proj.bias"] = (inter,)
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
    return shapes


def _expert_shapes(prefix: str, args: ModelArgs) -> dict[str, tuple[int, ...]]:
    assert args.moe is not None
    experts, inter, hidden = args.moe.num_experts, args.moe.intermediate_size, args.hidden_size
    block, (gate, up, down) = (
        (prefix + "block_sparse_moe.", ("w1", "w3", "w2"))
        if args.model_type == "mixtral"
        else (prefix + "mlp.", ("gate_proj", "up_proj", "down_proj"))
    )
    shapes: dict[str, tuple[int, ...]] = {
        block + "gate.weight": (experts, hidden),
        prefix + "mlp.gate.weight": (experts, hidden),
        prefix + "mlp.experts.gate_up_proj": (experts, 2 * inter, hidden),
        prefix + "mlp.experts.down_proj": (experts, hidden, inter),
    }
    for e in range(experts):
        shapes[f"{block}experts.{e}.{gate}.weight"] = (inter, hidden)
        shapes[f"{block}experts.{e}.{up}.weight"] = (inter, hidden)
        shapes[f"{block}experts.{e}.{down}.weight"] = (hidden, inter)
    return shapes


def check_shapes(state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Refuse, naming the tensor, weights whose shape config.json does not give (transformers
    refuses them too): else a step could fail mid-request (a router with more experts than
    the config's) or serve a model the config does not describe."""
    for name, shape in expected_shapes(args).items():
        if name in state and tuple(state[name].shape) != shape:
            moe = args.moe
            raise ValueError(
                f"{name} has shape {tuple(state[name].shape)} where config.json gives {shape} "
                f"(vocab_size={args.vocab_size}, hidden_size={args.hidden_size}, "
                f"intermediate_size={args.intermediate_size}, "
                f"num_attention_heads={args.num_heads}, "
                f"num_key_value_heads={args.num_kv_heads}, head_dim={args.head_dim}"
                + (
                    f", experts={moe.num_experts}, expert intermediate_size="
                    f"{moe.intermediate_size})"
                    if moe is not None
                    else ")"
                )
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
    config = read_config(model_dir)
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
