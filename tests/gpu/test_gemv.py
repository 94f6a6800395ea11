"""The Triton GEMV against F.linear: 1 to 4 rows, weights whose N and K are not multiples of
the blocks, with and without bias, unsplit and split along K (the last split reduces)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pdserve.engine.gpu.gemv import BLOCK_N, MAX_SPLIT_K, gemv, plan_gemv  # noqa: E402
from pdserve.engine.gpu.kernels import silu_mul  # noqa: E402
from tests.gpu.numerics import rel_err, tol  # noqa: E402

pytestmark = pytest.mark.interpretable


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(40, 300), (16, 128), (7, 1000)])
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_gemv_matches_f_linear(device, dtype, rows, n, k, split_k, with_bias):
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype) if with_bias else None
    out = gemv(x, w, bias, split_k=split_k)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert rel_err(out, F.linear(x, w, bias)) < tol(dtype)


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_gemv_with_silu_mul_input_matches_silu_mul_then_f_linear(device, dtype, rows, split_k):
    """The down projection reading the gate_up output: silu(gate) * up computed on the
    fly, rounded as the SiLU·mul kernel rounds."""
    k = 300
    gate_up = 3 * torch.randn(rows, 2 * k, device=device, dtype=dtype)
    w = torch.randn(40, k, device=device, dtype=dtype)
    out = gemv(gate_up, w, silu_mul_input=True, split_k=split_k)
    ref = F.linear(silu_mul(gate_up), w)
    assert rel_err(out, ref) < tol(dtype)


def test_gemv_split_counts_are_reset_so_repeated_calls_agree(device, dtype):
    """The reducing split puts the arrival counts back to zero: a second call with other
    inputs of the same shape (same workspace) is right too."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 700, generator=gen).to(device, dtype)
        w = torch.randn(33, 700, generator=gen).to(device, dtype)
        assert rel_err(gemv(x, w, split_k=4), F.linear(x, w)) < tol(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_gemv_replays_from_a_cuda_graph_with_new_inputs():
    """Captured after one call (which allocates the split workspace), replays read the
    static input's new values; the split path's counts are reset on every replay."""
    w = torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    gemv(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_err(out, F.linear(x, w)) < tol(torch.bfloat16)


@pytest.mark.parametrize(
    "n,k,split_k", [(2048, 2048, 8), (3072, 2048, 4), (2048, 8192, 8), (16384, 2048, 1)]
)
def test_plan_splits_small_matrices_until_the_gpu_is_covered(n, k, split_k):
    """bf16 on a 132-SM GPU: 256 columns a step; K split until about 8 programs per SM."""
    plan = plan_gemv(n, k, elem_bytes=2, num_sms=132)
    assert (plan.block_k, plan.split_k) == (256, split_k)
    assert plan.split_k * plan.k_per_split >= k > (plan.split_k - 1) * plan.k_per_split
    assert -(-n // BLOCK_N) * plan.split_k <= 8 * 132 or plan.split_k == 1


def test_plan_never_leaves_a_split_without_work():
    for k in range(1, 2000, 37):
        for split_k in (2, 3, 5, 8, 64):
            plan = plan_gemv(64, k, elem_bytes=4, num_sms=4, split_k=split_k)
            assert (plan.split_k - 1) * plan.k_per_split < k <= plan.split_k * plan.k_per_split
            assert plan.split_k <= MAX_SPLIT_K
