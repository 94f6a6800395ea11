"""Qwen3, Qwen3-MoE, Mixtral and an odd-shaped Llama: every logit of a prefill and 25 decode
steps within 1e-4 of transformers in float32, the sparse MLP computing only routed experts,
fields a config omits read with transformers' defaults, and configurations the engine does
not implement rejected at load, naming the field."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdserve.engine.loader import fingerprint, load_model
from pdserve.engine.model_args import ModelArgs, MoeArgs
from pdserve.engine.moe import moe_mlp
from pdserve.engine.moe_weights import MoeWeights
from pdserve.engine.request import Request, SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.families import BUILDERS, build_qwen3_moe

NUM_DECODE = 25


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_dir(request, tmp_path_factory) -> str:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def recorded_logits(engine, prompt_ids: list[int]) -> torch.Tensor:
    """Logits rows of every step: each prompt position, then one row per decode step."""
    seen: list[torch.Tensor] = []
    run = engine.runner.run

    def recording(batch):
        logits, items = run(batch)
        seen.append(logits.detach().clone())
        return logits, items

    engine.runner.run = recording
    params = SamplingParams(max_new_tokens=NUM_DECODE + 1, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("r", prompt_ids, params, return_logprob=True, logprob_start_len=0))
    generated: list[int] = []
    while engine.has_work():
        generated += [t for o in engine.step() for t in o.new_token_ids]
    assert engine.num_used_pages == 0
    return torch.cat(seen), generated


def test_prefill_and_decode_logits_match_transformers(family_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    prompt_ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    got, generated = recorded_logits(make_engine(family_dir), prompt_ids)
    assert got.shape[0] == len(prompt_ids) + NUM_DECODE  # two prefill chunks, 25 decode steps
    with torch.no_grad():
        ref = hf(torch.tensor([prompt_ids + generated])).logits[0, : got.shape[0]]
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max().item()


def _moe_weights(num_experts: int = 6, hidden: int = 16, inter: int = 8) -> MoeWeights:
    gen = torch.Generator().manual_seed(0)
    return MoeWeights(
        router=torch.randn(num_experts, hidden, generator=gen),
        gate_up=torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3,
        down=torch.randn(num_experts, hidden, inter, generator=gen) * 0.3,
    )


def _dense_reference(x: torch.Tensor, w: MoeWeights, moe: MoeArgs) -> torch.Tensor:
    probs = torch.softmax(x @ w.router.T, dim=-1)
    top_p, top_i = probs.topk(moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for p, e in zip(top_p[t].tolist(), top_i[t].tolist(), strict=True):
            gate, up = (w.gate_up[e] @ x[t]).chunk(2)
            out[t] += p * (w.down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_sparse_mlp_equals_per_token_expert_sum(norm_topk_prob):
    w = _moe_weights()
    moe = MoeArgs(6, 2, 8, norm_topk_prob, ())
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(moe_mlp(x, w, moe), _dense_reference(x, w, moe), atol=1e-5)


def test_sparse_mlp_never_touches_an_unrouted_expert():
    w = _moe_weights()
    moe = MoeArgs(6, 2, 8, True, ())
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    x[:, 0] = 1.0
    w.router[5] = 0.0
    w.router[5, 0] = -1e4  # expert 5 loses every token's routing
    w.gate_up[5] = float("nan")
    w.down[5] = float("nan")
    assert torch.isfinite(moe_mlp(x, w, moe)).all()


def _config(tmp_path, **changes) -> dict:
    path = build_qwen3_moe(tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        return {**json.load(f), **changes}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_sliding_window": True, "sliding_window": 512}, "use_sliding_window"),
        ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "qwen2_moe"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 4 heads: no whole group
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),  # rope turns pairs
        ({"rope_parameters": {"rope_type": "linear"}}, "factor"),
        # transformers turns a part of each head only under scaled rope, and then fails
        (
            {"rope_scaling": {"type": "linear", "factor": 2.0}, "partial_rotary_factor": 0.5},
            "partial_rotary_factor",
        ),
    ],
)
def test_unsupported_config_is_rejected_naming_the_field(tmp_path, changes, field):
    with pytest.raises(ValueError, match=field):
        ModelArgs.from_hf_config(_config(tmp_path, **changes))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3", "qwen2", "mistral", "mixtral"])
def test_swish_and_mlp_bias_of_a_family_without_mlp_biases_are_accepted(tmp_path, model_type):
    """transformers' ACT2FN reads "swish" as SiLU, and only Llama's MLP reads mlp_bias."""
    cfg = _config(tmp_path, model_type=model_type, hidden_act="swish", mlp_bias=True)
    assert not ModelArgs.from_hf_config(cfg).mlp_bias
    assert ModelArgs.from_hf_config({**cfg, "model_type": "llama"}).mlp_bias


def test_mixtral_sliding_window_is_rejected_only_when_a_sequence_can_outgrow_it():
    cfg = {"model_type": "mixtral", "num_attention_heads": 4, "num_key_value_heads": 4,
           "hidden_size": 64, "vocab_size": 10, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 1024}  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=512"):
        ModelArgs.from_hf_config({**cfg, "sliding_window": 512})
    assert ModelArgs.from_hf_config({**cfg, "sliding_window": 1024}).moe.num_experts == 4


@pytest.mark.parametrize(
    ("changes", "rejected"),
    [
        ({"use_sliding_window": False, "sliding_window": 512}, False),  # flag off: unused
        ({"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 1}, True),
        ({"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 4}, False),
        ({"use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 0}, False),
    ],
)
def test_qwen3_sliding_window_is_rejected_only_where_a_layer_uses_it(tmp_path, changes, rejected):
    from tests.engine.families import build_qwen3

    with open(os.path.join(build_qwen3(tmp_path), "config.json")) as f:
        cfg = {**json.load(f), "layer_types": None, **changes}  # 2 layers, 1024 positions
    if rejected:
        with pytest.raises(ValueError, match="max_window_layers=1"):
            ModelArgs.from_hf_config(cfg)
    else:
        assert ModelArgs.from_hf_config(cfg).qk_norm


def test_mlp_only_layers_and_sparse_step_pick_the_dense_layers(tmp_path):
    args = ModelArgs.from_hf_config(
        _config(tmp_path, num_hidden_layers=6, mlp_only_layers=[4], decoder_sparse_step=2)
    )
    assert [args.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_fingerprint_tells_routing_apart_for_the_same_weights(tmp_path):
    unnormalised = load_model(build_qwen3_moe(tmp_path / "a"), torch.float32, torch.device("cpu"))
    normalised = load_model(
        build_qwen3_moe(tmp_path / "b", norm_topk_prob=True), torch.float32, torch.device("cpu")
    )
    assert unnormalised.fingerprint != normalised.fingerprint
    with open(os.path.join(unnormalised.model_dir, "config.json")) as f:
        cfg = json.load(f)
    state = {"w": torch.ones(3)}
    assert fingerprint(cfg, state) != fingerprint({**cfg, "model_type": "mixtral"}, state)


_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                   "mistral": "MistralConfig", "mixtral": "MixtralConfig",
                   "qwen3_moe": "Qwen3MoeConfig"}  # fmt: skip


@pytest.mark.parametrize("model_type", list(_CONFIG_CLASSES))
def test_fields_a_config_omits_take_the_transformers_defaults_of_its_family(model_type):
    """A config.json with only the shape: eps, rope theta, context length, KV heads, head_dim
    and (Mistral) the sliding window are what transformers' class for the family assumes."""
    import transformers

    cfg = {"model_type": model_type, "vocab_size": 10, "hidden_size": 128,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 32,
           "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 8}  # fmt: skip
    ref = getattr(transformers, _CONFIG_CLASSES[model_type])(**cfg)
    if getattr(ref, "sliding_window", None):  # Mistral: windowed unless the config says not
        with pytest.raises(ValueError, match=f"sliding_window={ref.sliding_window}"):
            ModelArgs.from_hf_config(cfg)
        cfg["max_position_embeddings"] = ref.sliding_window
        ref = getattr(transformers, _CONFIG_CLASSES[model_type])(**cfg)
    args = ModelArgs.from_hf_config(cfg)
    assert args.rms_norm_eps == ref.rms_norm_eps
    assert args.rope_theta == ref.rope_parameters["rope_theta"]
    assert args.max_position_embeddings == ref.max_position_embeddings
    assert args.num_kv_heads == ref.num_key_value_heads
    assert args.head_dim == (getattr(ref, "head_dim", None) or 128 // 32)
    assert args.tie_word_embeddings == ref.tie_word_embeddings


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_expert_fields_a_config_omits_take_the_transformers_defaults(model_type):
    """No expert count or top-k in config.json: transformers assumes 8 experts top-2
    (Mixtral), 128 top-8 (Qwen3-MoE); they were read as 0 and the model refused."""
    import transformers

    cfg = {"model_type": model_type, "vocab_size": 10, "hidden_size": 64,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 8,
           "max_position_embeddings": 4096}  # fmt: skip
    ref = getattr(transformers, _CONFIG_CLASSES[model_type])(**cfg)
    moe = ModelArgs.from_hf_config(cfg).moe
    assert (moe.num_experts, moe.top_k) == (ref.num_local_experts, ref.num_experts_per_tok)
    assert moe.intermediate_size == getattr(ref, "moe_intermediate_size", ref.intermediate_size)
    assert moe.norm_topk_prob == getattr(ref, "norm_topk_prob", True)  # Mixtral: always
    for name in ("num_experts", "num_local_experts"):  # one field in transformers, any family
        named = ModelArgs.from_hf_config({**cfg, name: 4, "num_experts_per_tok": 2})
        assert named.moe.num_experts == 4, name


def test_a_context_length_beyond_the_sliding_window_is_refused(tmp_path):
    """A window as long as max_position_embeddings loads; a --context-length past it would
    let a sequence outgrow the window this engine does not apply."""
    import shutil

    from pdserve.engine.loader import resolve_model_dir

    shutil.copytree(resolve_model_dir("tiny-random"), tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        cfg = json.load(f)
    cfg.update(model_type="mistral", sliding_window=cfg["max_position_embeddings"])
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(cfg, f)
    assert make_engine(str(tmp_path / "m"), context_length=cfg["sliding_window"])
    with pytest.raises(ValueError, match="sliding_window"):
        make_engine(str(tmp_path / "m"), context_length=cfg["sliding_window"] + 1)


@pytest.mark.parametrize(
    ("changes", "tensor"),
    [
        # the router keeps 8 rows: tokens routed to experts 6 and 7 failed the first step
        ({"num_experts": 6}, "model.layers.0.mlp.gate.weight"),
        ({"moe_intermediate_size": 16}, "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ({"intermediate_size": 100}, "model.layers.1.mlp.gate_proj.weight"),  # the dense one
    ],
)
def test_moe_weights_that_do_not_fit_the_config_are_refused_at_load(tmp_path, changes, tensor):
    model_dir = build_qwen3_moe(tmp_path)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = {**json.load(f), **changes}
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"{tensor} has shape"):
        load_model(model_dir, torch.float32, torch.device("cpu"))


def test_a_config_without_model_type_is_read_as_the_family_its_architectures_name():
    """A Qwen2 config without model_type read as Llama would drop its q/k/v biases."""
    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 64,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 4}  # fmt: skip
    args = ModelArgs.from_hf_config(cfg)
    assert (args.model_type, args.qkv_bias) == ("qwen2", True)
    with pytest.raises(ValueError, match="no model_type.*GPT2LMHeadModel"):
        ModelArgs.from_hf_config({**cfg, "architectures": ["GPT2LMHeadModel"]})
    assert ModelArgs.from_hf_config({**cfg, "architectures": None}).model_type == "llama"
