"""The decode benchmark end to end on the CPU with its tiny shapes: it runs, writes its
report, and a MoE step's weight floor counts only the routed experts."""

from __future__ import annotations

import json

import torch

from pdserve.bench import gpu_bench
from pdserve.bench.gpu_bench_shapes import TINY_SHAPES, build_hf_model
from pdserve.engine.model import ModelArgs, weights_from_state_dict


def test_cpu_smoke_run_reports_every_shape(tmp_path):
    argv = ["--device", "cpu", "--dtype", "float32", "--shapes", "tiny-moe", "tiny-llama",
            "--prompt-len", "8", "--batch-size", "2", "--new-tokens", "6", "--batch1-steps", "6",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert gpu_bench.main(argv) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    by_shape = {r["shape"]: r for r in report["results"]}
    assert set(by_shape) == {"tiny-moe", "tiny-llama"}
    assert by_shape["tiny-moe"]["experts_read_per_layer"] == 2
    assert by_shape["tiny-llama"]["experts_read_per_layer"] is None
    for r in by_shape.values():
        assert r["floor_ms"] > 0 and r["bN_tok_s_ratio"] > 0
        assert r["pdserve"]["b1_graph_replay_ms"] is None  # no graphs on the CPU
        baseline = r["pdserve"]["no_overlap"]  # decode without overlap, same run
        assert baseline["b1_step_ms"] > 0 and baseline["bN_step_ms"] > 0


def test_moe_floor_counts_routed_experts_only():
    model = build_hf_model(TINY_SHAPES["tiny-moe"], torch.device("cpu"), torch.float32)
    args = ModelArgs.from_hf_config(model.config.to_dict())
    weights = weights_from_state_dict(model.state_dict(), args, torch.float32, torch.device("cpu"))
    layer = weights.layers[0].moe
    # in memory, transformers already stacks the experts: the engine shares them
    assert layer.gate_up.data_ptr() == model.model.layers[0].mlp.experts.gate_up_proj.data_ptr()
    unread = args.num_layers * (args.moe.num_experts - args.moe.top_k) * layer.expert_num_bytes()
    assert weights.num_bytes() - weights.num_bytes(args.moe.top_k) == unread
