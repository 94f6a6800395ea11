"""The front end's tokenizer: the direct load gives what AutoTokenizer gives, and only where
the files say AutoTokenizer would pick TokenizersBackend itself."""

from __future__ import annotations

import json
import shutil
import subprocess

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.serving.tokenizer_loader import declares_tokenizers_backend, load_tokenizer
from tests.helpers import PYTHON, python_path_env

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France? naïve über"},
]


def test_direct_load_equals_autotokenizer_on_tiny_random():
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir("tiny-random")
    assert declares_tokenizers_backend(model_dir)
    direct, auto = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert type(direct) is type(auto)
    text = "The model token page cache. naïve über 😀"
    assert direct.encode(text) == auto.encode(text)
    ids = auto.encode(text)
    assert direct.decode(ids) == auto.decode(ids)
    assert direct.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    ) == auto.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "all_special_ids"):
        assert getattr(direct, attr) == getattr(auto, attr), attr
    assert len(direct) == len(auto)


def _copy_with(tmp_path, config: dict | None = None, tok_config: dict | None = None) -> str:
    src = resolve_model_dir("tiny-random")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    for name, extra in (("config.json", config), ("tokenizer_config.json", tok_config)):
        if extra:
            data = json.loads((dst / name).read_text())
            (dst / name).write_text(json.dumps({**data, **extra}))
    return str(dst)


def test_other_model_types_and_remote_code_go_through_autotokenizer(tmp_path):
    # qwen2 is one for which AutoTokenizer overrides the declared class.
    assert not declares_tokenizers_backend(
        _copy_with(tmp_path / "a", config={"model_type": "qwen2"})
    )
    remote = {"auto_map": {"AutoTokenizer": [None, "x.Tok"]}}
    assert not declares_tokenizers_backend(_copy_with(tmp_path / "b", tok_config=remote))
    declared = {"tokenizer_class": "GPT2Tokenizer"}
    assert not declares_tokenizers_backend(_copy_with(tmp_path / "c", tok_config=declared))
    assert not declares_tokenizers_backend(str(tmp_path / "missing"))


def test_the_front_end_start_path_imports_no_torch():
    """What a PD front end runs before its workers are up: importing torch there (about 1 s
    of CPU, 3 s with sympy) would delay every server start."""
    code = (
        "import sys\n"
        "from pdserve.serve import hooks_for\n"
        "from pdserve.serving.http_server import serve\n"
        "from pdserve.engine.model_dir import resolve_model_dir\n"
        "from pdserve.serving.tokenizer_loader import load_tokenizer\n"
        "hooks_for('prefill'), hooks_for('decode')\n"
        "load_tokenizer(resolve_model_dir('tiny-random'))\n"
        "print(sorted(m for m in ('torch', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], env=python_path_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_loaded_tokenizer_has_settled_its_truncation_before_any_thread_uses_it(tmp_path):
    """A tokenizer.json may set truncation and padding; transformers resets them on the
    first encode (a write to the shared Rust tokenizer). Large bodies are tokenized in
    worker threads, so the loader makes that first call itself."""
    model_dir = _copy_with(tmp_path)
    path = tmp_path / "model" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["truncation"] = {
        "direction": "Right",
        "max_length": 8,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    path.write_text(json.dumps(data))
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.backend_tokenizer.truncation is None
