"""Penalized rows' ids kept on the device: penalize() over many incremental steps (rewinds,
tokens in flight, unpenalized rows beside) equals a full recount of the host's lists, and
the ids uploaded over a request's life grow with its length, not with its square."""

from __future__ import annotations

import random

import torch

from pdserve.engine.penalties import penalize
from pdserve.engine.request import Request, SamplingParams
from pdserve.engine.sampler import sample, sample_spec

VOCAB = 97
EOS = frozenset({2})
PARAMS = [
    dict(frequency_penalty=1.5),
    dict(presence_penalty=-1.0, min_new_tokens=30),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.6, frequency_penalty=0.4, presence_penalty=0.3),
    {},  # unpenalized: its row must be left as it is and pay nothing
]


def full_recount(
    logits: torch.Tensor, reqs: list[Request], ahead: list[int | None]
) -> torch.Tensor:
    """The penalized logits by the formulas, recounting every row's whole history."""
    out = logits.clone()
    for row, (req, ahead_id) in enumerate(zip(reqs, ahead, strict=True)):
        p = req.sampling
        if not p.penalized:
            continue
        output = req.output_ids + ([] if ahead_id is None else [ahead_id])
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=VOCAB).float()
        x = logits[row]
        if p.repetition_penalty != 1:
            seen = counts > 0
            seen[torch.tensor(req.prompt_ids, dtype=torch.long)] = True
            penalty = torch.tensor(p.repetition_penalty)
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        if len(output) < p.min_new_tokens:
            x = x.clone()
            x[sorted(EOS)] = float("-inf")
        out[row] = x
    return out


def test_incremental_ids_equal_a_full_recount_through_rewinds_and_tokens_in_flight():
    rng = random.Random(7)
    torch.manual_seed(7)
    reqs = [
        Request(
            f"r{i}",
            [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))],
            SamplingParams(temperature=0.0, max_new_tokens=500, **kw),
        )
        for i, kw in enumerate(PARAMS)
    ]
    for step in range(120):
        logits = torch.randn(len(reqs), VOCAB) * 3
        in_flight = [rng.random() < 0.4 for _ in reqs]
        ahead_ids = torch.tensor([rng.randrange(VOCAB) for _ in reqs])
        specs = [sample_spec(r, EOS, int(f)).penalty for r, f in zip(reqs, in_flight, strict=True)]
        got = penalize(logits, specs, ahead_ids)
        ahead = [int(a) if f else None for a, f in zip(ahead_ids, in_flight, strict=True)]
        assert torch.equal(got, full_recount(logits, reqs, ahead)), step
        for req in reqs:
            req.output_ids.extend(rng.randrange(VOCAB) for _ in range(rng.choice([1, 1, 1, 3])))
            if step % 25 == 24:  # rewind, then regrow past the old length with other ids
                del req.output_ids[rng.randrange(len(req.output_ids)) :]
    assert reqs[-1].penalty_ids is None  # the unpenalized request never got device ids


def test_a_rewind_that_regrows_to_the_same_length_rebuilds():
    req = Request("r", [5, 6], SamplingParams(temperature=0.0, frequency_penalty=2.0))
    req.output_ids.extend([1, 1, 1])
    logits = torch.zeros(1, VOCAB)
    sample(logits, [sample_spec(req, EOS)])
    req.output_ids[:] = [3, 3, 4]  # same length, another last id
    got = penalize(logits, [sample_spec(req, EOS).penalty], None)
    assert torch.equal(got, full_recount(logits, [req], [None]))


def test_ids_uploaded_over_a_generation_grow_linearly():
    prompt = list(range(10, 60))
    rep = Request("rep", prompt, SamplingParams(temperature=0.0, repetition_penalty=1.2))
    freq = Request("freq", prompt, SamplingParams(temperature=0.0, frequency_penalty=0.5))
    num_steps = 200
    for _ in range(num_steps):
        token_ids = sample(torch.randn(2, VOCAB), [sample_spec(r, EOS) for r in (rep, freq)])
        for req, token_id in zip((rep, freq), token_ids, strict=True):
            req.output_ids.append(token_id)
    # Step i counts the i output ids before it: each uploaded once, the prompt once.
    assert rep.penalty_ids.num_uploaded_ids == len(prompt) + num_steps - 1
    assert freq.penalty_ids.num_uploaded_ids == num_steps - 1  # no prompt without repetition
    assert rep.penalty_ids.num_output_ids == num_steps - 1
