"""Prefill figures of the GPU benchmark: the FLOPs of a batch of prompts, and pdserve's
prefill with its fused kernels against the shared PyTorch path (gather + masked SDPA) on the
same engine, both against the device's bf16 matmul rate. Runs in the `gpu_bench` process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.engine.engine import Engine
from pdserve.engine.model import ModelArgs
from pdserve.engine.request import Request, SamplingParams
from pdserve.engine.runner import ModelRunner


def prefill_flops(args: ModelArgs, num_prompts: int, prompt_len: int) -> float:
    """Useful FLOPs of prefilling the prompts: every layer matmul per token, causal
    attention (QK^T and PV over the keys at or before each query), lm_head per prompt."""
    hidden, head_dim = args.hidden_size, args.head_dim
    qkv = hidden * (args.num_heads + 2 * args.num_kv_heads) * head_dim
    o = args.num_heads * head_dim * hidden
    mlp = 3 * hidden * args.intermediate_size
    per_token = 2 * args.num_layers * (qkv + o + mlp)
    keys_seen = prompt_len * (prompt_len + 1) / 2
    attention = 4 * args.num_layers * args.num_heads * head_dim * keys_seen
    lm_head = 2 * hidden * args.vocab_size
    return num_prompts * (prompt_len * per_token + attention + lm_head)


def prefill_s(engine: Engine, prompts: list[list[int]], repeats: int = 3) -> float:
    """Best wall time of prefilling all prompts (one output token each), the engine's host
    work included."""
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i, ids in enumerate(prompts):
            engine.add_request(Request(f"prefill-{rep}-{i}", ids, params))
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def with_pytorch_prefill(engine: Engine, fn: Callable[[], float]) -> float:
    """fn() run while the GPU runner prefills through the shared PyTorch path."""
    runner = engine.runner
    runner._hidden_states = ModelRunner._hidden_states.__get__(runner)  # type: ignore[method-assign]
    try:
        return fn()
    finally:
        del runner._hidden_states


def measure_prefill(engine: Engine, prompts: list[list[int]], matmul_fps: float) -> dict[str, Any]:
    flops = prefill_flops(engine.model.args, len(prompts), len(prompts[0]))
    fused_s = prefill_s(engine, prompts)
    pytorch_s = with_pytorch_prefill(engine, lambda: prefill_s(engine, prompts))
    return {
        "prefill_tflop": flops / 1e12,
        "fused_s": fused_s,
        "fused_tflop_s": flops / fused_s / 1e12,
        "fused_over_matmul": flops / fused_s / matmul_fps,
        "pytorch_path_s": pytorch_s,
        "pytorch_path_tflop_s": flops / pytorch_s / 1e12,
        "speedup_over_pytorch_path": pytorch_s / fused_s,
    }
