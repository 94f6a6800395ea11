"""Engine API on tiny-random: refusals, stops, prompt scoring, seeded sampling whatever
the batch, preemption under page pressure, load accounting, a failing step."""

from __future__ import annotations

import pytest

from pdserve.engine.request import ReqState, Request, RequestRejected, SamplingParams
from pdserve.engine.stops import check_finish

PROMPT = [10 + (i * 13) % 450 for i in range(20)]


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def run(engine, *reqs: Request) -> dict[str, list]:
    for r in reqs:
        engine.add_request(r)
    outs: dict[str, list] = {r.rid: [] for r in reqs}
    while engine.has_work():
        for o in engine.step():
            outs[o.rid].append(o)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    return tiny_engine_factory(max_total_tokens=4096)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], greedy(), "empty"),
        (PROMPT, greedy(1020), "context length 1024"),
        ([99999], greedy(), r"token ids must be in \[0, "),
        (PROMPT, SamplingParams(temperature=-1), "temperature"),
    ],
)
def test_requests_that_can_never_run_are_rejected(engine, prompt, params, match):
    with pytest.raises(RequestRejected, match=match):
        engine.add_request(Request("bad", prompt, params))
    assert isinstance(RequestRejected("x"), ValueError)
    assert engine.get("bad") is None and not engine.has_work()


def test_more_pages_than_the_pool_is_rejected(tiny_engine_factory):
    small = tiny_engine_factory(max_total_tokens=64)
    with pytest.raises(RequestRejected, match="4 pages of 16 tokens"):
        small.add_request(Request("big", PROMPT * 3, greedy(10)))


def test_duplicate_rid_in_flight_is_rejected(engine):
    engine.add_request(Request("dup", PROMPT, greedy()))
    with pytest.raises(RequestRejected, match="already in flight"):
        engine.add_request(Request("dup", PROMPT, greedy()))
    engine.abort("dup", "cleanup")


def test_stop_token_ids_and_stop_strings_end_the_request(engine):
    reference = tokens(run(engine, Request("ref", PROMPT, greedy()))["ref"])
    target = reference[5]
    outs = run(engine, Request("tok", PROMPT, greedy(stop_token_ids=[target])))["tok"]
    assert tokens(outs) == reference[: reference.index(target) + 1]
    assert (outs[-1].finish_reason.type, outs[-1].finish_reason.matched) == ("stop", target)
    engine.outputs.detokenize = lambda ids: "".join(f"<{t}>" for t in ids)
    try:
        stop = f"<{reference[3]}><{reference[4]}>"
        outs = run(engine, Request("str", PROMPT, greedy(stop=[stop])))["str"]
    finally:
        engine.outputs.detokenize = None
    assert outs[-1].finish_reason.matched == stop
    assert tokens(outs)[-2:] == reference[3:5]


def test_eos_stops_unless_ignored():
    req = Request("e", [1], SamplingParams(max_new_tokens=5))
    req.output_ids = [7, 2]
    assert check_finish(req, frozenset({2}), None).matched == 2
    req.sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert check_finish(req, frozenset({2}), None) is None
    req.sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
    assert check_finish(req, frozenset({2}), None).type == "length"


def test_max_new_tokens_zero_scores_the_prompt_only(engine):
    req = Request("score", PROMPT, greedy(0), return_logprob=True, logprob_start_len=3)
    (out,) = run(engine, req)["score"]
    assert out.new_token_ids == [] and out.finish_reason.type == "length"
    assert len(out.prompt_logprobs) == len(PROMPT) - 3
    assert all(lp is not None and lp <= 0 for lp in out.prompt_logprobs)
    assert req.state is ReqState.FINISHED and engine.num_used_pages == 0


def test_top_logprobs_are_sorted_and_include_the_greedy_token(engine):
    outs = run(engine, Request("top", PROMPT, greedy(4), return_logprob=True, top_logprobs_num=3))
    for o in outs["top"]:
        (top,) = o.new_top_logprobs
        assert len(top) == 3 and top[0][0] == o.new_token_ids[0]
        assert top[0][1] == pytest.approx(o.new_token_logprobs[0])
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_seeded_request_gives_the_same_tokens_alone_or_in_a_batch(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, seed=77, ignore_eos=True)
    alone = tokens(run(engine, Request("s1", PROMPT, params))["s1"])
    others = [
        Request(f"o{i}", PROMPT[: 5 + i], SamplingParams(max_new_tokens=12 + i, temperature=0.7))
        for i in range(5)
    ]
    batched = run(engine, others[0], others[1], Request("s2", PROMPT, params), *others[2:])
    assert tokens(batched["s2"]) == alone


def test_preemption_under_page_pressure_keeps_outputs_exact(tiny_engine_factory):
    prompts = {f"p{i}": PROMPT[i:] + PROMPT[:i] for i in range(4)}
    roomy = tiny_engine_factory()
    expected = {
        rid: tokens(o)
        for rid, o in run(
            roomy, *(Request(rid, p, greedy(40)) for rid, p in prompts.items())
        ).items()
    }
    tight = tiny_engine_factory(max_total_tokens=128)  # 8 pages; the 4 requests need 16
    got = run(tight, *(Request(rid, p, greedy(40)) for rid, p in prompts.items()))
    assert {rid: tokens(o) for rid, o in got.items()} == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.num_used_pages == 0


def test_load_and_get_report_queues(tiny_engine_factory):
    engine = tiny_engine_factory(chunked_prefill_size=16)
    engine.add_request(Request("a", PROMPT, greedy()))
    engine.add_request(Request("b", PROMPT, greedy()))
    assert engine.load() == (0, 2, 40)
    engine.step()  # a: first chunk (16 of 20 tokens)
    assert engine.load() == (1, 1, 40) and engine.get("a").state is ReqState.PREFILLING
    assert engine.flush_cache() == 0  # nothing cached yet; flushing never waits for requests
    engine.abort("a", "x")  # its first (full, computed) page enters the cache
    engine.abort("b", "x")
    assert engine.flush_cache() == 1 and engine.num_cached_pages == 0


def test_a_failing_step_fails_its_requests_and_frees_pages(tiny_engine_factory, monkeypatch):
    engine = tiny_engine_factory()
    engine.add_request(Request("f", PROMPT, greedy()))

    def broken(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", broken)
    (out,) = engine.step()
    assert "device lost" in out.error and out.finish_reason.type == "abort"
    assert engine.num_used_pages == 0 and engine.get("f") is None


def test_kv_layout_describes_the_pool(engine):
    layout = engine.kv_layout()
    num_pages, num_layers, two, page_size, num_kv_heads, head_dim = engine.kv_pool.shape
    assert (two, num_pages) == (2, engine.num_total_pages)
    assert (layout.page_size, layout.num_layers) == (page_size, num_layers)
    assert (layout.num_kv_heads, layout.head_dim) == (num_kv_heads, head_dim)
    assert layout.kv_dtype == "float32" and layout.model_fingerprint == engine.model_fingerprint
    assert engine.kv_pool[0].is_contiguous()  # one page, every layer: one run of bytes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_run_with_a_pool_of_that_dtype(tiny_engine_factory, dtype):
    engine = tiny_engine_factory(dtype=dtype)
    assert str(engine.kv_pool.dtype) == f"torch.{dtype}" and engine.kv_layout().kv_dtype == dtype
    outs = run(engine, Request("h", PROMPT, greedy(8, top_k=5)), Request("s", PROMPT, greedy(8)))
    assert all(len(tokens(o)) == 8 for o in outs.values())
    assert engine.num_used_pages == 0


def test_prompt_logprobs_from_a_start_inside_a_later_chunk(tiny_engine_factory):
    engine = tiny_engine_factory(chunked_prefill_size=8)
    prompt = PROMPT * 2  # 40 tokens: five chunks

    def prompt_logprobs(start: int):
        req = Request(f"lp{start}", prompt, greedy(2), return_logprob=True, logprob_start_len=start)
        first = run(engine, req)[req.rid][0]
        return first.prompt_logprobs, first.prompt_top_logprobs

    full, _ = prompt_logprobs(0)
    assert len(full) == 40 and full[0] is None
    part, tops = prompt_logprobs(21)
    assert part == pytest.approx(full[21:], abs=1e-5)
    assert tops is None  # top_logprobs_num == 0
    assert prompt_logprobs(40)[0] == []
