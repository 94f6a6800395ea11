"""Resolving a model name to a Hugging Face directory, without importing torch: the front
end calls this before loading the tokenizer (torch is only needed to build a model the
first time, by the builders imported on that path)."""

from __future__ import annotations

import json
import os
from typing import Any

from pdserve.engine.model_cache import cached_model_dir

# Bump a version when the builder's output changes, so stale cache entries are not reused.
BUILTIN_MODELS = {
    "tiny-random": "tiny-random-v1",
    "smollm2-135m-instruct": "smollm2-135m-instruct-v1",
}


def resolve_model_dir(model_path: str) -> str:
    """A directory with config.json, tokenizer and *.safetensors for `model_path`: a
    built-in name (built into the cache on first use) or a local directory."""
    if model_path == "tiny-random":
        return cached_model_dir(BUILTIN_MODELS[model_path], _build_tiny_random)
    if model_path == "smollm2-135m-instruct":
        from pdserve.engine.gguf_convert import convert_gguf

        return cached_model_dir(BUILTIN_MODELS[model_path], convert_gguf)
    if os.path.isfile(os.path.join(model_path, "config.json")):
        read_config(model_path)  # a broken one fails the start here, named, not in a worker
        return os.path.abspath(model_path)
    raise ValueError(
        f"unknown model {model_path!r}: expected one of {sorted(BUILTIN_MODELS)} or a local "
        "Hugging Face directory with config.json and *.safetensors"
    )


def read_config(model_dir: str) -> dict[str, Any]:
    """config.json of `model_dir`; ValueError naming the file where it is no JSON object
    (json's own error named neither the file nor the directory)."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(raw).__name__}")
    for name in SIZE_FIELDS:
        value = raw.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}")
    return raw


# Sizes of a model, refused here, in the front end, unless positive integers: 0 heads failed
# every worker in a ZeroDivisionError (transformers' config, read with the tokenizer), a
# string or a negative size deep in transformers or torch.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


# Sampling fields of generation_config.json a request that omits them takes (vLLM's and
# SGLang's choice; transformers' generate applies repetition_penalty even when greedy).
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


# What --dtype auto runs a model in: the dtype its config.json names, if it is one of these.
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(model_dir: str) -> str:
    """The dtype config.json names (`dtype`, transformers 4's `torch_dtype`), float32 where
    it names none; ValueError for one the engine does not run (e.g. a quantized type)."""
    raw = read_config(model_dir)
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if name not in CHECKPOINT_DTYPES:
        raise ValueError(
            f"--dtype auto: the checkpoint's dtype {name!r} is not one pdserve runs "
            f"({', '.join(CHECKPOINT_DTYPES)}); pass --dtype"
        )
    return name


def sampling_defaults(model_dir: str) -> dict[str, float | int]:
    """The sampling fields the model's generation_config.json sets (numbers only)."""
    try:
        with open(os.path.join(model_dir, "generation_config.json"), encoding="utf-8") as f:
            generation = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(generation, dict):
        return {}
    return {
        name: generation[name]
        for name in SAMPLING_DEFAULT_FIELDS
        if isinstance(generation.get(name), int | float) and not isinstance(generation[name], bool)
    }


def _build_tiny_random(out_dir: str) -> None:
    from pdserve.engine.tiny_random import build_tiny_random  # imports torch

    build_tiny_random(out_dir)
