"""The front end's tokenizer, loaded without instantiating the model's config class where the
files already say which tokenizer AutoTokenizer would pick: that class pulls torch.distributed
and sympy into the front end, about 2 s of CPU on every server start."""

from __future__ import annotations

import json
import os
from typing import Any

# Model types for which AutoTokenizer loads a tokenizer_config.json that names
# TokenizersBackend (and no remote code) with TokenizersBackend itself: no tokenizer class is
# registered for them in transformers, so the declared class is used as is.
DIRECT_MODEL_TYPES = frozenset({"llama"})


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def declares_tokenizers_backend(model_dir: str) -> bool:
    """True when AutoTokenizer would load `model_dir` with TokenizersBackend, read from the
    files alone: a llama config, TokenizersBackend declared, no auto_map."""
    model_type = _read_json(os.path.join(model_dir, "config.json")).get("model_type")
    tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    return (
        model_type in DIRECT_MODEL_TYPES
        and tok_cfg.get("tokenizer_class") == "TokenizersBackend"
        and "auto_map" not in tok_cfg
        and os.path.exists(os.path.join(model_dir, "tokenizer.json"))
    )


def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer AutoTokenizer.from_pretrained(model_dir) gives, cheaper where possible,
    with one `encode` done: a fast tokenizer's first call resets the truncation or padding
    its tokenizer.json may set (a write to the Rust tokenizer), and large bodies are
    tokenized in worker threads, where two first calls at once could collide."""
    if declares_tokenizers_backend(model_dir):
        from transformers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(model_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.encode("")
    return tokenizer
