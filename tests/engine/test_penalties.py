"""Frequency, presence and repetition penalties and min_new_tokens: greedy tokens equal a
plain loop over transformers' logits, penalized rows leave the others alone, overlap on
and off agree (the in-flight token counts), also over long runs with preemptions, EOS and
stop ids wait for min_new_tokens."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.engine.request import Request, SamplingParams
from pdserve.engine.sampler import sample, sample_spec
from tests.engine.test_overlap import detokenize, run, summary

PROMPT = [10 + (i * 13) % 450 for i in range(20)]
NUM_NEW = 32  # tiny-random repeats itself only after ~17 tokens
PENALTIES = [
    dict(frequency_penalty=2.0),
    dict(presence_penalty=2.0),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7, frequency_penalty=-0.5),  # rewards repeats
    # Rewards that repeat the newest token, which overlap scheduling still has in flight:
    dict(repetition_penalty=0.5),
    dict(frequency_penalty=-2.0, presence_penalty=-2.0),
    dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1),
]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir("tiny-random")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_greedy(model, prompt: list[int], num_new: int, **penalties: float) -> list[int]:
    """Greedy decoding by hand: transformers' RepetitionPenaltyLogitsProcessor over prompt
    and output, then frequency and presence over the output's counts."""
    from transformers import RepetitionPenaltyLogitsProcessor

    rep = RepetitionPenaltyLogitsProcessor(penalties.get("repetition_penalty", 1.0))
    freq, pres = penalties.get("frequency_penalty", 0.0), penalties.get("presence_penalty", 0.0)
    out: list[int] = []
    for _ in range(num_new):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = rep(ids, model(ids).logits[:, -1].float())[0]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits))
        logits = logits - freq * counts - pres * (counts > 0)
        out.append(int(logits.argmax()))
    return out


def greedy_request(rid: str, num_new: int = NUM_NEW, **kw) -> Request:
    params = SamplingParams(max_new_tokens=num_new, temperature=0.0, ignore_eos=True, **kw)
    return Request(rid, list(PROMPT), params)


def penalized_requests() -> list[Request]:
    reqs = [greedy_request(f"p{i}", **kw) for i, kw in enumerate(PENALTIES)]
    return [*reqs, greedy_request("plain")]


def tokens(outs) -> dict[str, list[int]]:
    return {rid: toks for rid, (toks, _) in summary(outs).items()}


def test_penalized_greedy_equals_a_reference_loop_over_transformers(tiny_engine_factory, hf_model):
    got = tokens(run(tiny_engine_factory(), penalized_requests()))
    plain = reference_greedy(hf_model, PROMPT, NUM_NEW)
    assert got["plain"] == plain  # a penalized batch leaves unpenalized rows alone
    for i, kw in enumerate(PENALTIES):
        want = reference_greedy(hf_model, PROMPT, NUM_NEW, **kw)
        assert want != plain, kw  # the penalty changes the answer: the test can fail
        assert got[f"p{i}"] == want, kw


def test_overlap_on_and_off_give_the_same_penalized_tokens(tiny_engine_factory):
    outs = {
        mode: summary(run(tiny_engine_factory(overlap_schedule=mode), penalized_requests()))
        for mode in ("off", "on")
    }
    assert outs["on"] == outs["off"]


def test_a_logprobs_step_after_a_launched_buffer_growth_keeps_penalized_rows(
    tiny_engine_factory, hf_model
):
    """Past 64 tokens a launched (overlapped) step grows the request's device ids; a later
    step that samples after run(), as one with a logprobs row does, failed the batch (500)
    appending to them ("Inplace update to inference tensor outside InferenceMode")."""
    engine = tiny_engine_factory(overlap_schedule="on")
    penalized = greedy_request("pen", 80, frequency_penalty=2.0)
    engine.add_request(penalized)
    outs: list = []
    while len(penalized.output_ids) < 70:
        outs += engine.step()
    engine.add_request(Request("lp", [9, 10, 11], SamplingParams(), return_logprob=True))
    while engine.has_work():
        outs += engine.step()
    assert not [o.error for o in outs if o.error]
    assert penalized.output_ids == reference_greedy(hf_model, PROMPT, 80, frequency_penalty=2.0)


def test_min_new_tokens_keeps_stop_ids_out_until_reached(tiny_engine_factory):
    free = [greedy_request(rid, 12) for rid in ("free", "again")]  # run() adds half first
    produced = tokens(run(tiny_engine_factory(), free))["free"]
    stop_id = produced[1]
    engine = tiny_engine_factory(overlap_schedule="on")
    reqs = [
        greedy_request("plain", 12, stop_token_ids=[stop_id]),
        greedy_request("min", 12, stop_token_ids=[stop_id], min_new_tokens=6),
    ]
    outs = summary(run(engine, reqs))
    assert outs["plain"][0] == produced[:2]  # stops on it at once without min_new_tokens
    min_tokens, finish = outs["min"]
    assert len(min_tokens) >= 6 and stop_id not in min_tokens[:6]
    assert finish.type == "length" or min_tokens[-1] == stop_id


@pytest.mark.parametrize(("min_new_tokens", "num_tokens"), [(0, 3), (2, 3), (4, 12)])
def test_a_stop_string_counts_only_when_it_ends_past_min_new_tokens(
    tiny_engine_factory, min_new_tokens, num_tokens
):
    """The stop string is the text of output tokens 1 and 2: matched at token 3 unless
    min_new_tokens holds past it; then never (it does not end in a later token's text)."""
    free = [greedy_request(rid, 12) for rid in ("free", "again")]
    produced = tokens(run(tiny_engine_factory(), free))["free"]
    engine = tiny_engine_factory()
    engine.outputs.detokenize = detokenize
    stop = detokenize(produced[1:3])
    engine.add_request(greedy_request("r", 12, stop=[stop], min_new_tokens=min_new_tokens))
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    got, finish = [t for o in outs for t in o.new_token_ids], outs[-1].finish_reason
    assert got == produced[:num_tokens]
    assert finish.type == ("length" if num_tokens == 12 else "stop")


def test_min_new_tokens_bans_eos_unless_ignored_and_only_before_the_minimum():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])  # EOS (2) is the argmax

    def picked(output_len: int, ignore_eos: bool = False) -> int:
        params = SamplingParams(temperature=0.0, min_new_tokens=3, ignore_eos=ignore_eos)
        req = Request("r", [1], params, output_ids=[3] * output_len)
        return sample(logits, [sample_spec(req, frozenset({2}))])[0]

    assert picked(0) == 3 and picked(2) == 3
    assert picked(3) == 2
    assert picked(0, ignore_eos=True) == 2


def test_logprobs_stay_those_of_the_raw_logits(tiny_engine_factory):
    engine = tiny_engine_factory()
    reqs = [
        Request(
            rid,
            list(PROMPT),
            SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, **kw),
            return_logprob=True,
        )
        for rid, kw in (("plain", {}), ("pen", dict(frequency_penalty=2.0)))
    ]
    outs = run(engine, reqs)
    plain_lps = [lp for o in outs["plain"] for lp in o.new_token_logprobs]
    pen_lps = [lp for o in outs["pen"] for lp in o.new_token_logprobs]
    got = tokens(outs)
    same = next(i for i, (a, b) in enumerate(zip(got["plain"], got["pen"], strict=True)) if a != b)
    # Up to the first penalized choice the logits are the same, so are their logprobs;
    # the penalized choice is not the raw argmax, so its raw logprob is lower.
    assert pen_lps[:same] == pytest.approx(plain_lps[:same], rel=1e-4)
    assert pen_lps[same] < plain_lps[same]


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_long_penalized_greedy_through_preemption_equals_the_reference(
    tiny_engine_factory, hf_model, overlap
):
    """Each penalized request's ids live on the device across 80 steps (past the buffer's first growth) and preemptions
    (an 8-page pool for ~5 pages each); its tokens still equal a full recount's."""
    num_new = 80
    kinds = [PENALTIES[0], PENALTIES[2], PENALTIES[4], PENALTIES[6], {}]
    reqs = [greedy_request(f"r{i}", num_new, **kw) for i, kw in enumerate(kinds)]
    engine = tiny_engine_factory(overlap_schedule=overlap, max_total_tokens=128)
    got = tokens(run(engine, reqs))
    assert engine.scheduler.num_preemptions > 0
    for req, kw in zip(reqs, kinds, strict=True):
        assert got[req.rid] == reference_greedy(hf_model, PROMPT, num_new, **kw), kw
        if kw:  # each id went up once: no re-upload per step, nor after a preemption
            num_prompt = len(PROMPT) if "repetition_penalty" in kw else 0
            assert req.penalty_ids.num_uploaded_ids <= num_prompt + num_new
        else:
            assert req.penalty_ids is None
