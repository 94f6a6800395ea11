"""PD hooks: a prefill_only request holds its pages until release(); its KV copied into a
second engine's reserved pages + admit_prefilled() continues exactly as one engine would;
pages return to all-free after aborts in every state."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import ReqState, Request, RequestRejected, SamplingParams

PROMPT = [5 + (i * 7) % 400 for i in range(37)]  # three pages of 16, the last partial
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_engine_factory):
    """(colocated reference, prefill, decode): three engines on the same weights."""
    return tiny_engine_factory(), tiny_engine_factory(), tiny_engine_factory()


def drain(engine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.rid, []).append(o)
    return outs


def colocated_tokens(engine, rid: str, params: SamplingParams) -> list[int]:
    engine.add_request(Request(rid, PROMPT, params))
    return [t for o in drain(engine)[rid] for t in o.new_token_ids]


def prefill_then_decode(prefill, decode, rid: str, params: SamplingParams, **kw) -> list:
    """One request through both engines, moving KV pages the way the transfer does."""
    decode_req = Request(rid, PROMPT, params, **kw)
    assert decode.reserve(decode_req)
    assert decode_req.state is ReqState.WAITING_FOR_KV
    dst_pages = list(decode_req.page_ids)
    prefill.add_request(Request(rid, PROMPT, params, prefill_only=True, **kw))
    first = drain(prefill)[rid][-1]
    assert first.kv_ready and len(first.new_token_ids) == 1
    assert prefill.get(rid).state is ReqState.SENDING_KV
    # The step hands the held pages over: exactly the pages in use, one per decode page.
    assert len(first.held_page_ids) == prefill.num_used_pages == len(dst_pages)
    src = torch.tensor(first.held_page_ids)
    decode.kv_pool.index_copy_(0, torch.tensor(dst_pages), prefill.kv_pool.index_select(0, src))
    prefill.release(rid)
    assert prefill.num_used_pages == 0 and prefill.get(rid) is None
    logprob = first.new_token_logprobs[0] if first.new_token_logprobs else None
    outs = decode.admit_prefilled(rid, first.new_token_ids[0], logprob)
    assert outs[0].new_token_ids == first.new_token_ids  # the client sees the first token
    outs += drain(decode).get(rid, [])
    assert decode.num_used_pages == 0
    return outs


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_then_decode_equals_one_engine(engines, params):
    colocated, prefill, decode = engines
    expected = colocated_tokens(colocated, f"ref-{params.temperature}", params)
    outs = prefill_then_decode(prefill, decode, f"pd-{params.temperature}", params)
    assert [t for o in outs for t in o.new_token_ids] == expected
    assert outs[-1].finish_reason.type == "length"


def test_logprobs_survive_the_hand_over(engines):
    colocated, prefill, decode = engines
    colocated.add_request(Request("lp-ref", PROMPT, GREEDY, return_logprob=True))
    ref = [lp for o in drain(colocated)["lp-ref"] for lp in o.new_token_logprobs]
    outs = prefill_then_decode(prefill, decode, "lp-pd", GREEDY, return_logprob=True)
    assert [lp for o in outs for lp in o.new_token_logprobs] == pytest.approx(ref, abs=1e-5)


def test_held_pages_are_not_scheduled_and_stay_until_release(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.add_request(Request("p", PROMPT, GREEDY, prefill_only=True))
    drain(engine)
    assert not engine.has_work() and engine.step() == []
    assert engine.num_used_pages == 3
    engine.release("p")
    engine.release("p")  # already gone: nothing to do
    assert engine.num_used_pages == 0


def test_release_of_a_request_not_sending_kv_is_refused(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.add_request(Request("w", PROMPT, GREEDY))
    with pytest.raises(ValueError, match="not sending_kv"):
        engine.release("w")


def test_first_token_that_ends_the_request_finishes_at_admission(tiny_engine_factory):
    engine = tiny_engine_factory()
    req = Request("one", PROMPT, SamplingParams(max_new_tokens=1, temperature=0.0))
    assert engine.reserve(req)
    (out,) = engine.admit_prefilled("one", 42, -0.5)
    assert out.new_token_ids == [42] and out.finish_reason.type == "length"
    assert engine.num_used_pages == 0 and not engine.has_work()
    stop = Request("stop", PROMPT, SamplingParams(max_new_tokens=9, stop_token_ids=[42]))
    assert engine.reserve(stop)
    (out,) = engine.admit_prefilled("stop", 42)
    assert out.finish_reason.type == "stop" and out.finish_reason.matched == 42
    assert engine.num_used_pages == 0


def test_reserve_without_room_allocates_nothing(tiny_engine_factory):
    engine = tiny_engine_factory(max_total_tokens=64)  # 4 pages
    assert engine.reserve(Request("a", PROMPT, GREEDY))  # 3 pages
    assert not engine.reserve(Request("b", PROMPT, GREEDY))
    assert engine.num_used_pages == 3 and engine.get("b") is None
    with pytest.raises(RequestRejected, match="pages"):
        engine.reserve(Request("c", PROMPT * 3, GREEDY))
    engine.abort("a", "test")
    assert engine.num_free_pages == engine.num_total_pages


def test_pages_all_free_after_aborts_in_every_state(tiny_engine_factory):
    engine = tiny_engine_factory(chunked_prefill_size=16)
    long_prompt = PROMPT * 2  # 74 tokens: several chunks
    engine.add_request(Request("running", PROMPT[:5], GREEDY))
    engine.step()
    engine.add_request(Request("sending", PROMPT[:5], GREEDY, prefill_only=True))
    engine.add_request(Request("prefilling", long_prompt, GREEDY))
    engine.add_request(Request("waiting", long_prompt, GREEDY))
    engine.reserve(Request("for_kv", PROMPT, GREEDY))
    for _ in range(3):
        engine.step()
    rids = ["running", "sending", "prefilling", "waiting", "for_kv"]
    states = {rid: engine.get(rid).state for rid in rids}
    assert states == {
        "running": ReqState.RUNNING,
        "sending": ReqState.SENDING_KV,
        "prefilling": ReqState.PREFILLING,
        "waiting": ReqState.WAITING,
        "for_kv": ReqState.WAITING_FOR_KV,
    }
    for rid in states:
        req = engine.get(rid)
        out = engine.abort(rid, "client went away")
        assert out.finish_reason.type == "abort" and out.finish_reason.message == "client went away"
        assert req.state is ReqState.ABORTED
    assert engine.abort("running", "again") is None
    assert engine.num_used_pages == 0 and engine.num_free_pages == engine.num_total_pages
    assert not engine.has_work() and engine.load() == (0, 0, 0)
