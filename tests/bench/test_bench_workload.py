"""Workload generation: lengths, shared-prefix groups, trace blocks, and text prompts that
tokenize to their exact length with a real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench import textfit
from pdserve.bench.trace import TraceRow
from pdserve.bench.workload import (
    random_prompts,
    sample_lengths,
    shared_prefix_prompts,
    trace_prompts,
)

ALLOWED = list(range(10, 300))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_zero_spread_gives_the_mean_every_time():
    assert sample_lengths(rng(), 128, 0.0, "normal", 5) == [128] * 5


def test_uniform_lengths_stay_within_the_range():
    lens = sample_lengths(rng(), 100, 0.5, "uniform", 2000)
    assert min(lens) >= 50 and max(lens) <= 150
    assert min(lens) < 60 and max(lens) > 140  # the whole range is used


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_distributions_have_the_requested_mean_and_spread(dist: str):
    lens = np.array(sample_lengths(rng(), 1000, 0.3, dist, 20000))
    assert lens.mean() == pytest.approx(1000, rel=0.02)
    assert lens.std() / lens.mean() == pytest.approx(0.3, rel=0.1)
    assert lens.min() >= 1


def test_random_prompts_have_exact_lengths_and_allowed_ids():
    prompts = random_prompts(rng(), ALLOWED, [5, 17, 1], [3, 4, 5])
    assert [p.input_len for p in prompts] == [5, 17, 1]
    assert [p.output_len for p in prompts] == [3, 4, 5]
    assert {t for p in prompts for t in p.input_ids} <= set(ALLOWED)


def test_shared_prefix_groups_really_share_their_prefix():
    prompts = shared_prefix_prompts(rng(), ALLOWED, 3, 32, [8] * 9, [4] * 9)
    assert [p.group for p in prompts] == [0, 1, 2] * 3
    assert all(p.input_len == 40 for p in prompts)
    for group in range(3):
        members = [p for p in prompts if p.group == group]
        assert len({tuple(p.input_ids[:32]) for p in members}) == 1
        assert len({tuple(p.input_ids[32:]) for p in members}) == 3  # own suffixes
    assert len({tuple(p.input_ids[:32]) for p in prompts}) == 3  # groups differ


def test_trace_rows_with_equal_hash_ids_share_blocks():
    rows = [
        TraceRow(0, 20, 1, (1, 2, 3)),  # three whole blocks of 8, last one cut to 4
        TraceRow(0, 16, 1, (1, 2)),
        TraceRow(0, 30, 1, (1, 9)),  # longer than its blocks: a unique tail
        TraceRow(0, 16, 1, (7, 2)),
    ]
    a, b, c, d = trace_prompts(rows, ALLOWED, block_size=8, seed=0)
    assert [p.input_len for p in (a, b, c, d)] == [20, 16, 30, 16]
    assert a.input_ids[:16] == b.input_ids
    assert c.input_ids[:8] == a.input_ids[:8] and c.input_ids[8:16] != a.input_ids[8:16]
    assert d.input_ids[8:16] == a.input_ids[8:16]  # block 2 is the same block anywhere
    assert d.input_ids[:8] != a.input_ids[:8]
    assert a.shared_block_lens == (8, 8) and c.shared_block_lens == (8, 8)
    assert trace_prompts(rows, ALLOWED, 8, seed=0)[0] == a  # deterministic


@pytest.mark.parametrize("text_safe", [True, False])
def test_completion_texts_tokenize_to_the_requested_length(tokenizer, text_safe: bool):
    # unsafe ids include lone UTF-8 bytes, whose replacement characters resist a plain cut
    allowed = textfit.allowed_token_ids(tokenizer, text_safe=text_safe)
    assert not set(allowed) & set(tokenizer.all_special_ids)
    lens = sample_lengths(rng(), 60, 0.9, "uniform", 30)
    prompts = random_prompts(rng(), allowed, lens, [1] * 30)
    for p in textfit.attach_texts(tokenizer, prompts, chat=False, seed=0):
        assert len(tokenizer.encode(p.text)) == p.input_len


def test_chat_texts_count_the_template_tokens(tokenizer):
    allowed = textfit.allowed_token_ids(tokenizer, text_safe=True)
    prompts = random_prompts(rng(), allowed, [30, 45, 64], [1] * 3)
    for p in textfit.attach_texts(tokenizer, prompts, chat=True, seed=0):
        assert textfit.chat_token_count(tokenizer, p.text) == p.input_len


def test_shared_prefix_texts_start_with_the_same_text(tokenizer):
    allowed = textfit.allowed_token_ids(tokenizer, text_safe=True)
    prompts = shared_prefix_prompts(rng(), allowed, 2, 40, [10] * 6, [1] * 6)
    texts = textfit.attach_texts(tokenizer, prompts, chat=False, seed=0)
    for group in range(2):
        members = [p.text for p in texts if p.group == group]
        prefix = textfit.decode(tokenizer, prompts[group].input_ids[:40])
        assert all(t.startswith(prefix) and len(t) > len(prefix) for t in members)
    assert all(len(tokenizer.encode(p.text)) == 50 for p in texts)


def test_a_head_longer_than_the_target_is_refused(tokenizer):
    allowed = textfit.allowed_token_ids(tokenizer)
    head = textfit.decode(tokenizer, allowed[:20])
    with pytest.raises(ValueError, match="longer than"):
        textfit.fit_tail(tokenizer, lambda t: len(tokenizer.encode(t)), head, [], 5, rng(), allowed)


def test_trace_texts_share_the_text_of_shared_blocks(tokenizer):
    allowed = textfit.allowed_token_ids(tokenizer, text_safe=True)
    rows = [TraceRow(0, 40, 1, (5, 6, 7)), TraceRow(0, 35, 1, (5, 6)), TraceRow(0, 12, 1, (5,))]
    prompts = textfit.attach_texts(
        tokenizer, trace_prompts(rows, allowed, 16, seed=0), chat=False, seed=0
    )
    blocks = "".join(textfit.decode(tokenizer, prompts[0].input_ids[i : i + 16]) for i in (0, 16))
    assert prompts[0].text.startswith(blocks) and prompts[1].text.startswith(blocks)
    assert [len(tokenizer.encode(p.text)) for p in prompts] == [40, 35, 12]
