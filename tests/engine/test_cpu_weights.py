"""CPU weight layouts: wide matrices stored input-major, and the oneDNN-prepacked copy that
serves inputs of several rows while one row runs on the plain weight."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.loader import read_state_dict, resolve_model_dir
from pdserve.engine.model import (
    LayerWeights,
    Linear,
    ModelArgs,
    ModelWeights,
    pack_for_cpu,
    weights_from_state_dict,
)

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)


@needs_onednn
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 64, 300])
def test_linear_matches_f_linear_on_both_layouts(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(rows, 40, generator=gen)
    want = F.linear(x, weight, bias)
    got = Linear(weight, bias, _packed(weight))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_one_row_runs_on_the_plain_weight_and_several_on_the_packed_one():
    weight = torch.randn(32, 16)
    # a packed copy of zeros shows which layout answered
    linear = Linear(weight, None, _packed(torch.zeros_like(weight)))
    one, many = torch.randn(1, 16), torch.randn(3, 16)
    torch.testing.assert_close(linear(one), F.linear(one, weight))
    assert torch.count_nonzero(linear(many)) == 0


def _tiny_weights(**kwargs):
    model_dir = resolve_model_dir("tiny-random")
    with open(os.path.join(model_dir, "config.json")) as f:
        args = ModelArgs.from_hf_config(json.load(f))
    state = read_state_dict(model_dir)
    return (
        state,
        args,
        weights_from_state_dict(state, args, torch.float32, torch.device("cpu"), **kwargs),
    )


@needs_onednn
def test_loaded_cpu_weights_are_input_major_where_wide_and_packed():
    state, args, weights = _tiny_weights(cpu_packed_weights=True)
    for linear in weights.linears():
        out_features, in_features = linear.weight.shape
        assert linear.packed is not None
        # same values as the checkpoint, whatever the memory layout
        if out_features > in_features:
            assert linear.weight.stride() == (1, out_features)
        else:
            assert linear.weight.is_contiguous()
    torch.testing.assert_close(
        weights.layers[0].down.weight, state["model.layers.0.mlp.down_proj.weight"]
    )
    _, _, plain = _tiny_weights(cpu_packed_weights=False)
    assert all(linear.packed is None for linear in plain.linears())
    assert plain.num_bytes() == weights.num_bytes()  # a step reads one of the two copies


def test_pack_for_cpu_leaves_other_dtypes_plain():
    weight = torch.randn(8, 4, dtype=torch.float64)
    linear = Linear(weight)
    norm = torch.ones(4, dtype=torch.float64)
    weights = ModelWeights(
        embed=weight,
        layers=[
            LayerWeights(norm, Linear(weight), Linear(weight), norm, Linear(weight), Linear(weight))
        ],
        norm=norm,
        lm_head=linear,
    )
    pack_for_cpu(weights)
    assert linear.packed is None
