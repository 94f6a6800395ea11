"""Loader: built-in model names resolve to cached HF directories (built once, race-safe),
tiny-random ships a ChatML tokenizer, fingerprints identify weights, rope config layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.loader import fingerprint, load_model, read_state_dict, resolve_model_dir
from pdserve.engine.model_args import ModelArgs
from pdserve.engine.rope import inv_frequencies, rope_params_from_hf
from tests.helpers import REPO_ROOT, python_path_env


def test_tiny_random_has_a_chatml_tokenizer_matching_the_model():
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir("tiny-random")
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert len(tok) == config["vocab_size"]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("What is the capital of France?").input_ids
    assert tok.decode(ids) == "What is the capital of France?"


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tiny-random"):
        resolve_model_dir("no-such-model")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", " is not valid JSON: Expecting value"),
        ("[1, 2]", " must hold a JSON object"),
        ('{"num_attention_heads": 0}', ": num_attention_heads must be a positive integer, got 0"),
        ('{"hidden_size": "64"}', ": hidden_size must be a positive integer, got '64'"),
        ('{"num_hidden_layers": -1}', ": num_hidden_layers must be a positive integer"),
    ],
)
def test_a_model_directory_whose_config_json_is_unusable_is_refused_naming_the_file(
    tmp_path, text, error
):
    """Refused in the front end, before any worker starts. Invalid JSON failed the start as
    json's bare "Expecting value: line 1 column 1"; a list, or 0 heads, passed the front end
    and failed every worker in a transformers traceback (TypeError, ZeroDivisionError)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}{error}"):
        resolve_model_dir(str(tmp_path))


_BUILD = (
    "from pdserve.engine.loader import load_model; import torch; "
    "print(load_model('tiny-random', torch.float32, torch.device('cpu')).fingerprint)"
)


def test_two_processes_building_at_once_agree(tmp_path):
    env = {**python_path_env(), "PDSERVE_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    prints = {out.strip() for out, _ in results}
    assert len(prints) == 1
    assert prints == {load_model("tiny-random", torch.float32, torch.device("cpu")).fingerprint}
    entries = sorted(os.listdir(tmp_path))
    assert "tiny-random-v1" in entries
    assert not [e for e in entries if ".tmp-" in e]  # the loser cleaned up


def test_fingerprint_changes_with_the_weights(tmp_path):
    src = resolve_model_dir("tiny-random")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    config = json.load(open(copy / "config.json"))
    base = fingerprint(config, read_state_dict(str(copy)))
    assert base == fingerprint(config, read_state_dict(src))
    state = load_file(copy / "model.safetensors")
    state["model.norm.weight"][0] += 1.0
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(config, read_state_dict(str(copy))) != base
    assert fingerprint({**config, "num_key_value_heads": 4}, state) != base


def test_rope_config_in_both_transformers_layouts():
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    current = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}
    for cfg in (legacy, current):
        theta, scaling = rope_params_from_hf(cfg)
        assert theta == 500000.0 and scaling["rope_type"] == "linear"
    assert rope_params_from_hf(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    ) == (7.0, None)
    assert rope_params_from_hf({}) == (10000.0, None)
    with pytest.raises(ValueError, match="yarn"):
        rope_params_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_theta": 5000.0},
        {"rope_scaling": {"type": "linear", "factor": 3.0}, "rope_theta": 500.0},
        {
            "rope_parameters": {
                **_LLAMA3,
                "rope_theta": 5000.0,
                "original_max_position_embeddings": 32,
            }
        },
        # without the pretraining length transformers takes max_position_embeddings, ...
        {"rope_parameters": {**_LLAMA3, "rope_theta": 5000.0}},
        {"rope_scaling": _LLAMA3, "rope_theta": 5000.0},
        # ... and a top-level original_max_position_embeddings wins over the rope dict's
        {
            "rope_scaling": {**_LLAMA3, "original_max_position_embeddings": 32},
            "original_max_position_embeddings": 16,
        },
        # rope_scaling is the rope dict wherever it is given, its rope_theta included
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
        {
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        },
    ],
    ids=[
        "default",
        "linear",
        "llama3",
        "llama3-no-original",
        "llama3-legacy",
        "llama3-top-level",
        "theta-in-rope-scaling",
        "rope-scaling-over-parameters",
    ],
)
def test_rope_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 64, **rope}  # fmt: skip
    args = ModelArgs.from_hf_config(cfg)
    got = inv_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    want = LlamaRotaryEmbedding(LlamaConfig(**cfg)).inv_freq
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)


def _tiny_copy(tmp_path, **config_changes) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(resolve_model_dir("tiny-random"), copy)
    config = {**json.load(open(copy / "config.json")), **config_changes}
    json.dump(config, open(copy / "config.json", "w"))
    return str(copy)


def test_an_lm_head_in_the_checkpoint_is_used_even_where_the_config_says_tied(tmp_path):
    """transformers keeps a checkpoint's lm_head that differs from the embedding (it warns
    and does not tie); tying would decode with the wrong matrix."""
    model_dir = _tiny_copy(tmp_path, tie_word_embeddings=True)
    loaded = load_model(model_dir, torch.float32, torch.device("cpu"))
    state = read_state_dict(model_dir)
    assert torch.equal(loaded.weights.lm_head.weight, state["lm_head.weight"])


def test_an_untied_checkpoint_without_lm_head_is_refused_at_load(tmp_path):
    model_dir = _tiny_copy(tmp_path)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(model_dir, torch.float32, torch.device("cpu"))
    tied = _tiny_copy(tmp_path / "tied", tie_word_embeddings=True)
    save_file(state, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(tied, torch.float32, torch.device("cpu"))
    assert torch.equal(loaded.weights.lm_head.weight, state["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    ("changes", "tensor"),
    [
        ({"head_dim": 8}, "model.layers.0.self_attn.q_proj.weight"),
        ({"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight"),
        ({"vocab_size": 300}, "model.embed_tokens.weight"),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused_at_load(tmp_path, changes, tensor):
    with pytest.raises(ValueError, match=tensor):
        load_model(_tiny_copy(tmp_path, **changes), torch.float32, torch.device("cpu"))


def _add_attention_biases(model_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(model_dir, "model.safetensors")
    state = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for name in list(state):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            bias = name.removesuffix("weight") + "bias"
            state[bias] = torch.randn(state[name].shape[0], generator=gen)
    save_file(state, path, metadata={"format": "pt"})
    return state


@pytest.mark.parametrize(
    ("changes", "qkv_bias", "o_bias"),
    [
        ({}, False, False),  # Llama without attention_bias
        ({"model_type": "mistral", "attention_bias": True}, False, False),  # never biased
        ({"model_type": "qwen2"}, True, False),  # q/k/v always, o never
        ({"attention_bias": True}, True, True),
    ],
)
def test_attention_biases_are_those_the_config_gives_not_all_the_checkpoint_holds(
    tmp_path, changes, qkv_bias, o_bias
):
    """transformers builds each projection's bias from the family and attention_bias and
    drops any other bias tensor of the checkpoint; adding one changes every token."""
    model_dir = _tiny_copy(tmp_path, **changes)
    state = _add_attention_biases(model_dir)
    layer = load_model(model_dir, torch.float32, torch.device("cpu")).weights.layers[0]
    attn = "model.layers.0.self_attn."
    want_qkv = torch.cat([state[f"{attn}{n}_proj.bias"] for n in "qkv"]) if qkv_bias else None
    want_o = state[attn + "o_proj.bias"] if o_bias else None
    for got, want in ((layer.qkv.bias, want_qkv), (layer.o.bias, want_o)):
        assert (got is None) == (want is None) and (want is None or torch.equal(got, want))


def test_greedy_tokens_ignore_biases_the_config_does_not_give(tmp_path):
    model_dir = _tiny_copy(tmp_path)
    _add_attention_biases(model_dir)
    got, expected = _engine_and_transformers_greedy(model_dir, seed=1)
    assert got == expected


def _add_mlp_biases(model_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(model_dir, "model.safetensors")
    state = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for name in list(state):
        if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            bias = name.removesuffix("weight") + "bias"
            state[bias] = torch.randn(state[name].shape[0], generator=gen)
    save_file(state, path, metadata={"format": "pt"})
    return state


@pytest.mark.parametrize(
    ("changes", "biases_used"),
    [
        ({"mlp_bias": True, "hidden_act": "swish"}, True),  # Llama builds MLP biases
        ({"model_type": "mistral", "mlp_bias": True}, False),  # Mistral has none: ignored
    ],
)
def test_mlp_bias_and_swish_give_transformers_greedy_tokens(tmp_path, changes, biases_used):
    """transformers reads "swish" as SiLU, builds MLP biases from mlp_bias in Llama only,
    and drops a checkpoint's MLP biases in the families that have none."""
    plain_dir = _tiny_copy(tmp_path / "plain", **{**changes, "mlp_bias": False})
    model_dir = _tiny_copy(tmp_path, **changes)
    _add_mlp_biases(model_dir)
    got, expected = _engine_and_transformers_greedy(model_dir, seed=2)
    assert got == expected
    plain, _ = _engine_and_transformers_greedy(plain_dir, seed=2, reference=False)
    assert (got != plain) == biases_used  # the biases matter where they are built


@pytest.mark.parametrize(
    ("changes", "dropped"),
    [
        ({"attention_bias": True}, "model.layers.0.self_attn.k_proj.bias"),
        ({"mlp_bias": True}, "model.layers.1.mlp.up_proj.bias"),
        ({}, "model.layers.3.mlp.down_proj.weight"),
        ({}, "model.norm.weight"),
    ],
)
def test_a_tensor_the_config_needs_missing_from_the_checkpoint_is_refused_naming_it(
    tmp_path, changes, dropped
):
    model_dir = _tiny_copy(tmp_path, **changes)
    _add_mlp_biases(model_dir)
    state = _add_attention_biases(model_dir)
    del state[dropped]
    save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"no tensor '{dropped}'"):
        load_model(model_dir, torch.float32, torch.device("cpu"))


def test_a_sharded_checkpoint_loads_the_shards_its_index_names_and_nothing_beside_them(tmp_path):
    """Mistral's repositories hold consolidated.safetensors (every weight again, under other
    names) beside the shards; transformers reads only what the index names, as pdserve must
    (else twice the memory, and a stray file's tensors could replace the shards')."""
    from transformers import AutoModelForCausalLM

    src = resolve_model_dir("tiny-random")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    shards = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.isfile(sharded / "model.safetensors.index.json")
    state = read_state_dict(str(sharded))
    stray = {name: torch.zeros_like(t) for name, t in state.items()}
    stray["layers.0.attention.wq.weight"] = torch.zeros(4)
    save_file(stray, sharded / "zz-consolidated.safetensors", metadata={"format": "pt"})
    got = read_state_dict(str(sharded))
    assert got.keys() == state.keys()
    assert all(torch.equal(got[name], state[name]) for name in state)
    os.remove(sharded / shards[-1])
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        read_state_dict(str(sharded))


def test_a_checkpoint_without_safetensors_is_refused_naming_what_it_holds(tmp_path):
    model_dir = _tiny_copy(tmp_path)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    torch.save(state, os.path.join(model_dir, "pytorch_model.bin"))
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*only safetensors"):
        load_model(model_dir, torch.float32, torch.device("cpu"))


def _engine_and_transformers_greedy(
    model_dir: str, seed: int, reference: bool = True
) -> tuple[list[int], list[int] | None]:
    """Greedy tokens of pdserve's engine and (with `reference`) of transformers for one
    random 20-token prompt drawn with `seed`."""
    from transformers import AutoModelForCausalLM

    from tests.engine.conftest import make_engine
    from tests.engine.test_model_reference import greedy_req, hf_greedy, run_all, tokens

    ids = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    got = tokens(run_all(make_engine(model_dir), [greedy_req("r", ids)])["r"])
    if not reference:
        return got, None
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return got, hf_greedy(hf, ids)
