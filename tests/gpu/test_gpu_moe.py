"""The Triton grouped-GEMM MoE block against the PyTorch sparse MLP it replaces: the expert
layout covers every assignment once, results agree, unrouted experts are never read, and
the decode kernels give the PyTorch path's greedy tokens for Qwen3, Qwen3-MoE, Mixtral and
an odd-shaped Llama (head_dim 24, one KV head)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine.gpu.moe import align_by_expert, fused_moe_mlp  # noqa: E402
from pdserve.engine.model_args import MoeArgs  # noqa: E402
from pdserve.engine.moe import MoeWeights, moe_mlp_torch  # noqa: E402
from pdserve.engine.request import Request, SamplingParams  # noqa: E402
from tests.engine.conftest import make_engine  # noqa: E402
from tests.engine.families import BUILDERS  # noqa: E402
from tests.engine.test_model_reference import prompt, run_all, tokens  # noqa: E402
from tests.gpu.numerics import rel_err  # noqa: E402

pytestmark = pytest.mark.interpretable


@pytest.mark.parametrize(("num_assignments", "block_m"), [(1, 16), (2, 16), (40, 16), (700, 64)])
def test_expert_layout_puts_each_assignment_once_in_a_block_of_its_expert(
    device, num_assignments, block_m
):
    num_experts = 12
    expert_ids = torch.randint(0, num_experts, (num_assignments,), device=device)
    sorted_ids, block_expert = align_by_expert(expert_ids, num_experts, block_m)
    blocks = sorted_ids.view(-1, block_m).cpu()
    real = blocks[blocks < num_assignments]
    assert sorted(real.tolist()) == list(range(num_assignments))
    for ids, expert in zip(blocks.tolist(), block_expert.cpu().tolist(), strict=True):
        routed = [i for i in ids if i < num_assignments]
        if expert == num_experts:
            assert not routed  # a block past the routed ones holds only padding
        else:
            assert routed and all(expert_ids[i].item() == expert for i in routed)


def random_moe(device, dtype, num_experts=8, hidden=64, inter=96) -> MoeWeights:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    return MoeWeights(
        router=randn(num_experts, hidden, std=0.5),
        gate_up=randn(num_experts, 2 * inter, hidden, std=0.2),
        down=randn(num_experts, hidden, inter, std=0.2),
    )


@pytest.mark.parametrize("num_tokens", [1, 3, 64, 600])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_fused_moe_matches_the_pytorch_sparse_mlp(device, dtype, num_tokens, norm_topk_prob):
    weights = random_moe(device, dtype)
    moe = MoeArgs(8, 2, 96, norm_topk_prob, ())
    x = torch.randn(num_tokens, 64, device=device).to(dtype)
    ref = moe_mlp_torch(x, weights, moe)
    assert rel_err(fused_moe_mlp(x, weights, moe), ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_fused_moe_never_reads_an_unrouted_expert(device):
    weights = random_moe(device, torch.float32)
    moe = MoeArgs(8, 2, 96, True, ())
    x = torch.randn(50, 64, device=device)
    x[:, 0] = 1.0
    weights.router[3] = 0.0
    weights.router[3, 0] = -1e4  # expert 3 loses every token's routing
    weights.gate_up[3] = float("nan")
    weights.down[3] = float("nan")
    assert torch.isfinite(fused_moe_mlp(x, weights, moe)).all()


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_dir(request, tmp_path_factory) -> str:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def engine_on_decode_kernels(model_dir: str, device: torch.device):
    """On CUDA the engine as served (graphs on); on a CPU under the interpreter the same
    decode kernels without graphs, the CPU engine's prefill unchanged."""
    if device.type == "cuda":
        return make_engine(model_dir, device="cuda", max_running_requests=8)
    from pdserve.engine.gpu.runner import GpuModelRunner

    engine = make_engine(model_dir)
    engine.runner = GpuModelRunner(
        engine.model, engine.kv_pool, 16, engine.max_context_len, 8, cuda_graphs=False
    )
    return engine


def greedy_tokens(engine, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=num_new, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"r{i}", ids, params) for i, ids in enumerate(prompts)]
    outs = run_all(engine, reqs)
    assert engine.num_used_pages == 0
    return [tokens(outs[r.rid]) for r in reqs]


def test_decode_kernels_give_the_pytorch_path_tokens(device, family_dir):
    prompts = [prompt(n, salt=2) for n in (3, 17, 40)]
    expected = greedy_tokens(make_engine(family_dir), prompts, 6)
    assert greedy_tokens(engine_on_decode_kernels(family_dir, device), prompts, 6) == expected
