"""The shapes sweep's pure parts (the sweep itself starts servers per shape, too slow for CI):
every shape has a topology, is a configuration pdserve accepts with the KV layout it names,
and the prompts straddle page boundaries and share a prefix past four pages."""

from __future__ import annotations

import json
import os

import pytest

from pdserve.bench.shapes_sweep import SHAPES, TOPOLOGIES, build_model, workload
from pdserve.engine.model_args import ModelArgs


def test_every_shape_has_a_topology_with_odd_and_unit_pages_and_dp_2_on_both_sides():
    assert set(SHAPES) == set(TOPOLOGIES)
    page_sizes = {page_size for page_size, _, _ in TOPOLOGIES.values()}
    assert {1, 16} <= page_sizes and any(p % 2 for p in page_sizes if p > 1)
    assert (2, 2) in {(prefill, decode) for _, prefill, decode in TOPOLOGIES.values()}


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_prompts_straddle_the_page_size_and_share_a_prefix(page_size):
    prompts = workload(page_size)
    lengths = {len(ids) for name, ids in prompts.items() if name.startswith("d")}
    assert {page_size, page_size + 1} <= lengths
    prefix = prompts["s3"]
    assert len(prefix) > 4 * page_size
    assert all(prompts[f"s{i}"][: len(prefix)] == prefix for i in range(3))


@pytest.mark.parametrize("shape", ["qwen3-odd", "llama-mha-bias-linear"])
def test_shape_is_a_model_pdserve_reads_with_its_heads(tmp_path, shape):
    model = build_model(shape, str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        args = ModelArgs.from_hf_config(json.load(f))
    cfg = model.config
    assert (args.num_kv_heads, args.head_dim) == (cfg.num_key_value_heads, cfg.head_dim)
    biased = shape == "llama-mha-bias-linear"
    assert (args.qkv_bias, args.o_bias, args.mlp_bias) == (biased, biased, biased)
