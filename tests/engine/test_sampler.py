"""Sampler: filter masks, greedy, seeded determinism independent of batch and of which
call (or process) samples token i, the sampled distribution, logprobs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pdserve.engine.sampler import SampleSpec, filter_probs, logprobs_of, sample, token_seed
from tests.helpers import REPO_ROOT


def spec(seed=1, index=0, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0) -> SampleSpec:
    return SampleSpec(temperature, top_k, top_p, min_p, seed, index)


def probs_row(*values: float) -> torch.Tensor:
    return torch.tensor([values])


def kept(probs: torch.Tensor, top_k=None, top_p=1.0, min_p=0.0) -> list[int]:
    vocab = probs.shape[-1]
    out = filter_probs(
        probs, torch.tensor([top_k or vocab]), torch.tensor([top_p]), torch.tensor([min_p])
    )
    return torch.nonzero(out[0]).flatten().tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(probs_row(0.1, 0.4, 0.2, 0.3), top_k=2) == [1, 3]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = probs_row(0.1, 0.4, 0.2, 0.3)
    assert kept(probs, top_p=0.5) == [1, 3]  # 0.4 < 0.5, so 0.3 is needed too
    assert kept(probs, top_p=0.4) == [1]
    assert kept(probs, top_p=0.01) == [1]  # the most likely token always stays


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert kept(probs_row(0.1, 0.4, 0.2, 0.3), min_p=0.5) == [1, 2, 3]
    assert kept(probs_row(0.1, 0.4, 0.2, 0.3), min_p=0.6) == [1, 3]


def test_filters_combine():
    assert kept(probs_row(0.1, 0.4, 0.2, 0.3), top_k=3, top_p=0.6, min_p=0.3) == [1, 3]


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sample(logits, [spec(temperature=0.0), spec(top_k=1)]) == [1, 0]


def test_seeded_token_is_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    alone = [sample(logits[2:3], [spec(seed=42, index=i)])[0] for i in range(20)]
    for i in range(20):
        specs = [spec(seed=s, index=i, top_p=0.9) for s in range(6)]
        specs[2] = spec(seed=42, index=i)
        assert sample(logits, specs)[2] == alone[i]
    assert len(set(alone)) > 1  # it really samples


def test_token_i_depends_only_on_seed_and_index_not_on_call_order():
    logits = torch.randn(1, 100)
    forward = [sample(logits, [spec(seed=7, index=i)])[0] for i in range(10)]
    backward = [sample(logits, [spec(seed=7, index=i)])[0] for i in reversed(range(10))]
    assert forward == backward[::-1]


_CHILD = """
import torch
from pdserve.engine.sampler import SampleSpec, sample
torch.manual_seed(123)  # a different global RNG state must not matter
logits = torch.arange(64, dtype=torch.float32).sin()[None] * 3
print(sample(logits, [SampleSpec(1.0, None, 0.95, 0.0, 7, 5)])[0])
"""


def test_another_process_samples_the_same_token_i():
    logits = torch.arange(64, dtype=torch.float32).sin()[None] * 3
    here = sample(logits, [spec(seed=7, index=5, top_p=0.95)])[0]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == here


def test_different_seeds_and_indices_give_different_streams():
    assert token_seed(1, 0) != token_seed(1, 1) != token_seed(2, 0)
    assert 0 <= token_seed(2**63 - 1, 10**6) < 2**63


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    counts = torch.zeros(4)
    for i in range(3000):
        counts[sample(logits, [spec(seed=3, index=i)])[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


@pytest.mark.parametrize("temperature", [1e-37, 5e-324])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    # 5e-324 is 0 in float32, 1e-37 makes the logits overflow: both gave NaN -> token 0.
    logits = torch.tensor([[0.0, 30.0, 1.0], [50.0, 0.0, 60.0]])
    assert sample(logits, [spec(temperature=temperature)] * 2) == [1, 2]


def test_overflowed_logits_share_the_row_not_nan():
    # A positive logit over a repetition_penalty of 1e-40 is +inf: the row was NaN -> token 0.
    logits = torch.tensor([[1.0, 2.0, float("inf"), float("inf")]])
    picks = {sample(logits, [spec(seed=4, index=i, temperature=0.5)])[0] for i in range(50)}
    assert picks == {2, 3}


def test_low_temperature_concentrates_on_the_mode():
    logits = torch.tensor([[1.0, 1.2, 0.8]])
    picks = [sample(logits, [spec(seed=5, index=i, temperature=0.05)])[0] for i in range(200)]
    assert picks.count(1) > 190


def test_filtered_tokens_are_never_sampled():
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 1.6]])
    picks = {sample(logits, [spec(seed=9, index=i, top_k=2)])[0] for i in range(300)}
    assert picks == {0, 1}


def test_logprobs_are_log_softmax_of_raw_logits_with_sorted_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    chosen, tops = logprobs_of(logits, [2, 0], [2, 0])
    expected = torch.log_softmax(logits, -1)
    assert chosen == pytest.approx([expected[0, 2].item(), expected[1, 0].item()])
    assert [t for t, _ in tops[0]] == [1, 2]
    assert tops[0][0][1] == pytest.approx(expected[0, 1].item())
    assert tops[1] == []


def reference_filter(probs, top_k, top_p, min_p):
    """The definition, by a full sort of every row."""
    values, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1])
    mass_before = values.cumsum(-1) - values
    drop = (rank >= top_k[:, None]) | (mass_before > top_p[:, None])
    drop |= values < min_p[:, None] * values[:, :1]
    return torch.zeros_like(probs).scatter_(-1, order, values.masked_fill(drop, 0.0))


def test_candidate_shortcut_equals_a_full_sort_including_flat_rows():
    torch.manual_seed(0)
    vocab = 5000
    sharp = torch.softmax(torch.randn(4, vocab) * 4, -1)
    flat = torch.softmax(torch.randn(4, vocab) * 0.01, -1)  # nucleus far beyond 256 tokens
    probs = torch.cat([sharp, flat])
    top_k = torch.tensor([vocab, 40, 600, vocab, vocab, 1000, vocab, 3])
    top_p = torch.tensor([0.9, 1.0, 0.95, 1.0, 0.5, 0.99, 1.0, 0.7])
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.0, 0.0, 0.2, 0.0])
    got = filter_probs(probs, top_k, top_p, min_p)
    want = reference_filter(probs, top_k, top_p, min_p)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want)
    assert (got[4] > 0).sum() > 256  # the flat row took the full-sort path
