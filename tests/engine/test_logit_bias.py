"""logit_bias in the engine: +100 forces a token (greedy and seeded sampling), -100 bans
one, unbiased rows of the same batch keep their exact tokens, overlap on and off agree,
and logprobs stay those of the raw logits."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.logit_bias import add_logit_bias
from pdserve.engine.request import Request, RequestRejected, SamplingParams
from tests.engine.test_overlap import run, summary

PROMPT = [10 + (i * 13) % 450 for i in range(20)]
NUM_NEW = 16
FORCED_ID = 123
MODES = ["off", "on"]


def request(rid: str, seed: int | None = None, **kw) -> Request:
    """Greedy, or sampled at temperature 1 when seeded."""
    temperature = 0.0 if seed is None else 1.0
    sampling = SamplingParams(
        max_new_tokens=NUM_NEW, ignore_eos=True, temperature=temperature, seed=seed, **kw
    )
    return Request(rid, list(PROMPT), sampling)


def tokens(engine, reqs: list[Request]) -> dict[str, list[int]]:
    """Each request's tokens; a second half of the requests joins while the first decodes."""
    if len(reqs) == 1:  # run() adds the first half, none, before it steps
        reqs = [*reqs, request("plain")]
    return {rid: toks for rid, (toks, _) in summary(run(engine, reqs)).items()}


@pytest.fixture(scope="module")
def unbiased(tiny_engine_factory) -> dict[str, list[int]]:
    """Each request's tokens without any bias: greedy and seeded."""
    return tokens(tiny_engine_factory(), [request("greedy"), request("seeded", seed=7)])


@pytest.mark.parametrize("overlap", MODES)
def test_a_plus_100_bias_forces_its_token_every_step(tiny_engine_factory, unbiased, overlap):
    assert FORCED_ID not in unbiased["greedy"] + unbiased["seeded"]  # the bias decides
    bias = {FORCED_ID: 100.0}
    reqs = [request("greedy", logit_bias=bias), request("seeded", seed=7, logit_bias=bias)]
    got = tokens(tiny_engine_factory(overlap_schedule=overlap), reqs)
    assert got == {"greedy": [FORCED_ID] * NUM_NEW, "seeded": [FORCED_ID] * NUM_NEW}


@pytest.mark.parametrize("overlap", MODES)
def test_a_minus_100_bias_bans_the_token_greedy_would_pick(tiny_engine_factory, unbiased, overlap):
    banned = unbiased["greedy"][0]
    got = tokens(
        tiny_engine_factory(overlap_schedule=overlap),
        [request("greedy", logit_bias={banned: -100.0})],
    )["greedy"]
    assert got != unbiased["greedy"]
    assert banned not in got


@pytest.mark.parametrize("overlap", MODES)
def test_seeded_sampling_never_draws_banned_tokens(tiny_engine_factory, unbiased, overlap):
    banned = set(unbiased["seeded"])
    reqs = [request("seeded", seed=7, logit_bias={t: -100 for t in banned})]
    got = tokens(tiny_engine_factory(overlap_schedule=overlap), reqs)["seeded"]
    assert len(got) == NUM_NEW and not banned & set(got)


@pytest.mark.parametrize("overlap", MODES)
def test_unbiased_rows_keep_their_tokens_in_a_batch_with_biased_ones(
    tiny_engine_factory, unbiased, overlap
):
    reqs = [
        request("forced", logit_bias={FORCED_ID: 100.0}),
        request("greedy"),
        request("banned", seed=3, logit_bias={unbiased["seeded"][0]: -100.0}),
        request("seeded", seed=7),
    ]
    got = tokens(tiny_engine_factory(overlap_schedule=overlap), reqs)
    assert got["greedy"] == unbiased["greedy"]
    assert got["seeded"] == unbiased["seeded"]
    assert got["forced"] == [FORCED_ID] * NUM_NEW


def test_logprobs_stay_those_of_the_raw_logits(tiny_engine_factory):
    """The forced token's logprob is its raw one: far below 0, which it would be nearly
    equal to under the biased distribution."""
    req = request("forced", logit_bias={FORCED_ID: 100.0})
    req.return_logprob = True
    outs = run(tiny_engine_factory(), [req, request("plain")])["forced"]
    logprobs = [lp for o in outs for lp in o.new_token_logprobs]
    assert len(logprobs) == NUM_NEW
    assert max(logprobs) < -1.0


@pytest.mark.parametrize(
    ("bias", "problem"),
    [
        ({-1: 1.0}, "token id -1 is outside the vocabulary"),
        ({10**6: 1.0}, "token id 1000000 is outside the vocabulary"),
        ({5: 100.5}, "bias 100.5 for token 5 must be in [-100, 100]"),
        ({5: float("nan")}, "bias nan for token 5"),
        ({t: 1.0 for t in range(1025)}, "has 1025 entries; at most 1024"),
    ],
)
def test_the_engine_rejects_a_bad_bias(tiny_engine_factory, bias, problem):
    engine = tiny_engine_factory()
    with pytest.raises(RequestRejected, match="logit_bias") as info:
        engine.add_request(request("r", logit_bias=bias))
    assert problem in str(info.value)


def test_a_bias_is_added_to_the_logit_not_put_in_its_place():
    """+2 on one token of row 0 and -1.5 on two of row 2: those logits move by exactly that,
    nothing else changes, and the raw logits are left as they were."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    raw = logits.clone()
    biased = add_logit_bias(logits, [{7: 2.0}, None, {0: -1.5, 49: -1.5}])
    expected = raw.clone()
    expected[0, 7] += 2.0
    expected[2, [0, 49]] -= 1.5
    assert torch.equal(biased, expected)
    assert torch.equal(logits, raw)
    assert add_logit_bias(logits, [None, {}, None]) is logits  # no bias: no work
