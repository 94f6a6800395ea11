"""Benchmark workloads as token ids: random lengths, shared-prefix groups, trace replay.

Pure (numpy only, no I/O): runs in the `pdserve bench` client before any request is sent.
Text for the OpenAI routes is made from these ids by `pdserve.bench.textfit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.trace import TraceRow


@dataclass(frozen=True)
class Prompt:
    """One request of a workload. `text` is filled in for the text endpoints."""

    input_ids: list[int]
    output_len: int
    group: int | None = None  # shared-prefix group, None when the prompt shares nothing
    # lengths of the leading blocks other prompts may share (a group prefix, trace blocks);
    # text is made block by block there so that shared blocks stay equal as text too
    shared_block_lens: tuple[int, ...] = ()
    text: str | None = None

    @property
    def input_len(self) -> int:
        return len(self.input_ids)


def sample_lengths(
    rng: np.random.Generator, mean: int, ratio: float, dist: str, count: int
) -> list[int]:
    """`count` lengths around `mean`, each >= 1. `ratio` is the uniform half-width as a share
    of the mean, or the coefficient of variation of a normal or lognormal distribution."""
    if ratio == 0:
        return [mean] * count
    if dist == "uniform":
        low = max(1, int(round(mean * (1 - ratio))))
        high = max(low, int(round(mean * (1 + ratio))))
        values = rng.integers(low, high + 1, size=count)
    elif dist == "normal":
        values = rng.normal(mean, ratio * mean, size=count)
    elif dist == "lognormal":
        # the underlying normal's parameters that give this mean and coefficient of variation
        sigma = float(np.sqrt(np.log1p(ratio**2)))
        values = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size=count)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return [max(1, int(round(v))) for v in values]


def random_ids(rng: np.random.Generator, allowed_ids: Sequence[int], count: int) -> list[int]:
    """`count` token ids drawn uniformly from `allowed_ids` (the vocabulary less specials)."""
    picks = rng.integers(0, len(allowed_ids), size=count)
    return [int(allowed_ids[i]) for i in picks]


def random_prompts(
    rng: np.random.Generator,
    allowed_ids: Sequence[int],
    input_lens: Sequence[int],
    output_lens: Sequence[int],
) -> list[Prompt]:
    return [
        Prompt(random_ids(rng, allowed_ids, n_in), n_out)
        for n_in, n_out in zip(input_lens, output_lens, strict=True)
    ]


def shared_prefix_prompts(
    rng: np.random.Generator,
    allowed_ids: Sequence[int],
    num_groups: int,
    prefix_len: int,
    suffix_lens: Sequence[int],
    output_lens: Sequence[int],
) -> list[Prompt]:
    """Prompt i belongs to group i mod num_groups: that group's prefix, then its own suffix.
    Interleaving the groups makes consecutive requests hit different prefixes."""
    prefixes = [random_ids(rng, allowed_ids, prefix_len) for _ in range(num_groups)]
    prompts = []
    for i, (n_suffix, n_out) in enumerate(zip(suffix_lens, output_lens, strict=True)):
        group = i % num_groups
        ids = prefixes[group] + random_ids(rng, allowed_ids, n_suffix)
        prompts.append(Prompt(ids, n_out, group=group, shared_block_lens=(prefix_len,)))
    return prompts


def trace_block(seed: int, hash_id: int, allowed_ids: Sequence[int], block_size: int) -> list[int]:
    """The tokens of one trace block: a function of its hash id, so equal ids share tokens."""
    return random_ids(np.random.default_rng([seed, hash_id]), allowed_ids, block_size)


def trace_prompts(
    rows: Sequence[TraceRow], allowed_ids: Sequence[int], block_size: int, seed: int
) -> list[Prompt]:
    """One prompt per trace row, `input_length` tokens long: the row's blocks in order (the
    last one cut short where the length ends inside it), then unique tokens if the row is
    longer than its blocks. Rows whose hash ids start alike share that many blocks."""
    rng = np.random.default_rng([seed, 1 << 32])
    cache: dict[int, list[int]] = {}
    prompts = []
    for row in rows:
        ids: list[int] = []
        for hash_id in row.hash_ids:
            if len(ids) >= row.input_length:
                break
            if hash_id not in cache:
                cache[hash_id] = trace_block(seed, hash_id, allowed_ids, block_size)
            ids.extend(cache[hash_id])
        num_whole_blocks = min(len(ids), row.input_length) // block_size
        del ids[row.input_length :]
        ids.extend(random_ids(rng, allowed_ids, row.input_length - len(ids)))
        blocks = (block_size,) * num_whole_blocks
        prompts.append(Prompt(ids, row.output_length, shared_block_lens=blocks))
    return prompts
