"""The engine on a CUDA device gives the CPU engine's greedy tokens (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def generate(engine, seed: int | None) -> list[int]:
    temperature = 0.0 if seed is None else 0.8
    params = SamplingParams(max_new_tokens=32, temperature=temperature, seed=seed, ignore_eos=True)
    engine.add_request(Request("g", list(range(5, 45)), params))
    out: list[int] = []
    while engine.has_work():
        out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def test_cuda_engine_matches_cpu_greedy(tiny_engine_factory):
    cpu = tiny_engine_factory()
    gpu = tiny_engine_factory(device="cuda")
    assert gpu.kv_pool.is_cuda
    assert generate(gpu, None) == generate(cpu, None)
    assert gpu.num_used_pages == 0
    assert len(generate(gpu, 3)) == 32


def test_cuda_penalized_greedy_matches_cpu_with_overlap(tiny_engine_factory):
    """The GPU runner's overlapped steps count the token still in flight on the device."""
    from tests.engine.test_overlap import run, summary
    from tests.engine.test_penalties import penalized_requests

    cpu = summary(run(tiny_engine_factory(overlap_schedule="off"), penalized_requests()))
    gpu_engine = tiny_engine_factory(device="cuda", overlap_schedule="on")
    assert gpu_engine.overlap
    assert summary(run(gpu_engine, penalized_requests())) == cpu


def test_cuda_logit_bias_matches_cpu_with_overlap(tiny_engine_factory):
    """A bias is added on the device in overlapped steps too: greedy rows give the CPU's
    tokens, a forced seeded row only its forced token."""
    from tests.engine.test_logit_bias import FORCED_ID, NUM_NEW, request
    from tests.engine.test_overlap import run, summary

    def requests() -> list:
        return [
            request("forced", logit_bias={FORCED_ID: 100.0}),
            request("banned", logit_bias={FORCED_ID: -100.0, 5: -100.0}),
            request("greedy"),
            request("seeded", seed=7, logit_bias={FORCED_ID: 100.0}),
        ]

    cpu = summary(run(tiny_engine_factory(overlap_schedule="off"), requests()))
    gpu_engine = tiny_engine_factory(device="cuda", overlap_schedule="on")
    assert gpu_engine.overlap
    gpu = summary(run(gpu_engine, requests()))
    assert gpu == cpu
    assert gpu["seeded"][0] == [FORCED_ID] * NUM_NEW
