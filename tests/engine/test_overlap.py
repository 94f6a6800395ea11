"""Overlap scheduling on the CPU (the same engine code as on a GPU, without the asynchrony):
tokens, finish reasons, pages and cached pages equal those of steps run one at a time;
a request that stops, is aborted or preempted while a step is in flight never gets the
extra token; random adds, steps and aborts keep those invariants (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.engine.request import Request, SamplingParams

PROMPT = [10 + (i * 13) % 450 for i in range(20)]


def detokenize(ids: list[int]) -> str:
    return "".join(f"<{t}>" for t in ids)


def requests() -> list[Request]:
    """Greedy, seeded and logprob requests with length, stop-token and stop-string ends."""
    reqs = []
    for i in range(8):
        prompt = PROMPT[i:] + PROMPT[: 3 * i]
        kw = dict(max_new_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True)
        if i % 3 == 1:
            kw.update(temperature=0.9, seed=100 + i)
        if i == 5:
            kw.update(top_k=40, top_p=0.9)
        reqs.append(Request(f"r{i}", prompt, SamplingParams(**kw), return_logprob=i == 2))
    return reqs


def run(engine, reqs: list[Request], add_after_steps: int = 3) -> dict[str, list]:
    """Half the requests first, the rest while those decode; every output per request,
    checking that none comes after the request's finish."""
    outs: dict[str, list] = {r.rid: [] for r in reqs}
    half = len(reqs) // 2
    for r in reqs[:half]:
        engine.add_request(r)
    num_steps = 0
    while engine.has_work():
        if num_steps == add_after_steps:
            for r in reqs[half:]:
                engine.add_request(r)
        for o in engine.step():
            assert not outs[o.rid] or outs[o.rid][-1].finish_reason is None, o.rid
            outs[o.rid].append(o)
        num_steps += 1
    return outs


def summary(outs: dict[str, list]) -> dict[str, tuple]:
    """Tokens and finish reason per request (logprobs apart: batches differ by the rows of
    dropped tokens, so float sums may round differently)."""
    return {
        rid: ([t for o in os_ for t in o.new_token_ids], os_[-1].finish_reason)
        for rid, os_ in outs.items()
    }


def logprobs(outs: dict[str, list]) -> dict[str, list[float]]:
    return {rid: [lp for o in os_ for lp in o.new_token_logprobs] for rid, os_ in outs.items()}


def stop_on_later_tokens(engine, reqs: list[Request]) -> list[Request]:
    """The same requests, some ending on a token or a string they produce midway."""
    reference = summary(run(engine, [_copy(r) for r in reqs]))
    stopped = []
    for i, r in enumerate(reqs):
        produced, _ = reference[r.rid]
        params = r.sampling
        if i % 4 == 0 and len(produced) > 4:
            params = SamplingParams(**{**_fields(params), "stop_token_ids": [produced[3]]})
        elif i % 4 == 2 and len(produced) > 5:
            stop = detokenize(produced[4:6])
            params = SamplingParams(**{**_fields(params), "stop": [stop]})
        stopped.append(Request(r.rid, r.prompt_ids, params, return_logprob=r.return_logprob))
    return stopped


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}


def _copy(r: Request) -> Request:
    return Request(r.rid, r.prompt_ids, r.sampling, return_logprob=r.return_logprob)


@pytest.mark.parametrize("radix_cache", [True, False], ids=["cache", "no-cache"])
def test_overlap_gives_the_tokens_finishes_and_pages_of_unoverlapped_steps(
    tiny_engine_factory, radix_cache
):
    engines = {
        mode: tiny_engine_factory(overlap_schedule=mode, disable_radix_cache=not radix_cache)
        for mode in ("off", "on")
    }
    for engine in engines.values():
        engine.outputs.detokenize = detokenize
    assert engines["on"].overlap and not engines["off"].overlap
    reqs = stop_on_later_tokens(tiny_engine_factory(overlap_schedule="off"), requests())
    outs = {mode: run(e, [_copy(r) for r in reqs]) for mode, e in engines.items()}
    assert summary(outs["on"]) == summary(outs["off"])
    assert {f.type for _, f in summary(outs["on"]).values()} == {"length", "stop"}
    on_lps, off_lps = logprobs(outs["on"]), logprobs(outs["off"])
    assert on_lps["r2"] and on_lps["r2"] == pytest.approx(off_lps["r2"], rel=1e-4)
    for engine in engines.values():
        assert engine.num_used_pages == 0 and not engine.has_work()
    on, off = engines["on"], engines["off"]
    assert sorted(on.cached_page_hashes()) == sorted(off.cached_page_hashes())
    assert on.num_free_pages == off.num_free_pages == on.num_total_pages


def test_overlap_under_page_pressure_preempts_and_keeps_outputs_exact(tiny_engine_factory):
    prompts = {f"p{i}": PROMPT[i:] + PROMPT[:i] for i in range(4)}

    def reqs() -> list[Request]:
        greedy = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        return [Request(rid, p, greedy) for rid, p in prompts.items()]

    expected = summary(run(tiny_engine_factory(overlap_schedule="off"), reqs()))
    tight = tiny_engine_factory(overlap_schedule="on", max_total_tokens=128)  # 8 pages
    assert summary(run(tight, reqs())) == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.num_used_pages == 0


def test_a_request_aborted_with_a_step_in_flight_gets_no_more_tokens(tiny_engine_factory):
    engine = tiny_engine_factory(overlap_schedule="on")
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("a", PROMPT, greedy))
    engine.add_request(Request("b", PROMPT[5:], greedy))
    seen: dict[str, int] = {"a": 0, "b": 0}
    while seen["a"] < 4:
        for o in engine.step():
            seen[o.rid] += len(o.new_token_ids)
    assert engine.get("a") in engine._in_flight.reqs  # a step with a row for it is launched
    assert engine.abort("a", "client left").finish_reason.type == "abort"
    pages_of_b = len(engine.get("b").page_ids)
    assert engine.num_used_pages == pages_of_b
    while engine.has_work():
        for o in engine.step():
            assert o.rid == "b"
            seen[o.rid] += len(o.new_token_ids)
    assert seen["b"] == 30 and engine.num_used_pages == 0


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 24)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 7), st.just(0)),
    ),
    max_size=40,
)


def alone_tokens(engine, prompt: list[int], max_new_tokens: int) -> list[int]:
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("alone", prompt, greedy))
    got: list[int] = []
    while engine.has_work():
        got += [t for o in engine.step() for t in o.new_token_ids]
    return got


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_overlap_keeps_its_invariants_through_adds_steps_and_aborts(tiny_engine_factory, ops):
    """Random adds, steps and aborts on a 16-page pool (preemptions, cached pages): no
    token after a request's finish or abort, each request's tokens a prefix of its tokens
    alone (all of them unless aborted), and every page back once the engine is idle."""
    engine = tiny_engine_factory(overlap_schedule="on", max_total_tokens=256)
    reqs: list[tuple[str, list[int], int]] = []
    tokens: dict[str, list[int]] = {}
    closed: set[str] = set()  # finished or aborted
    aborted: set[str] = set()

    def step() -> None:
        for o in engine.step():
            assert o.rid not in closed, o.rid
            tokens[o.rid] += o.new_token_ids
            if o.finish_reason is not None:
                closed.add(o.rid)

    for kind, a, b in ops:
        if kind == "add":
            rid, prompt = f"r{len(reqs)}", (PROMPT[len(reqs) % 7 :] * 2)[:a]
            reqs.append((rid, prompt, b))
            tokens[rid] = []
            greedy = SamplingParams(max_new_tokens=b, temperature=0.0, ignore_eos=True)
            engine.add_request(Request(rid, prompt, greedy))
        elif kind == "abort" and a < len(reqs) and engine.abort(reqs[a][0], "fuzz"):
            closed.add(reqs[a][0])
            aborted.add(reqs[a][0])
        elif kind == "step" and engine.has_work():
            step()
    while engine.has_work():
        step()
    assert engine.num_used_pages == 0
    assert engine.num_free_pages == engine.num_total_pages
    reference = tiny_engine_factory(overlap_schedule="off")
    for rid, prompt, max_new_tokens in reqs:
        expected = alone_tokens(reference, prompt, max_new_tokens)
        got = tokens[rid]
        assert got == expected[: len(got)], rid
        assert rid in aborted or got == expected, rid
