"""The prefix cache in the engine (tiny-random, CPU): tokens with the cache on equal the
tokens with it off, whatever the shared prefix; cached_tokens is reported; a pool smaller
than the working set evicts and stays exact; no page outlives its request except in the
cache; the decode role's reserve() reuses a cached prefix when asked."""

from __future__ import annotations

import pytest

from pdserve.engine.request import ReqState, Request, SamplingParams

PAGE = 16
SYSTEM = [10 + (i * 13) % 450 for i in range(3 * PAGE)]  # three full pages


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def run(engine, *reqs: Request) -> dict[str, list]:
    for r in reqs:
        engine.add_request(r)
    outs: dict[str, list] = {r.rid: [] for r in reqs}
    while engine.has_work():
        for o in engine.step():
            outs[o.rid].append(o)
    assert engine.num_used_pages == 0
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def match_prefix(engine, prompt: list[int]) -> tuple[list[int], int]:
    """(cached page ids, cached tokens) a new request with this prompt would start from now
    (page-aligned, at most len(prompt) - 1 tokens); nothing is pinned."""
    page_ids = engine.scheduler.pages.match(Request("probe", prompt, greedy()))
    return page_ids, len(page_ids) * PAGE


def answer(engine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """(output tokens, cached_tokens reported)."""
    outs = run(engine, Request(rid, prompt, params))[rid]
    return tokens(outs), outs[-1].cached_tokens


@pytest.fixture(scope="module")
def engines(tiny_engine_factory):
    """(cache on, cache off) on the same weights."""
    return tiny_engine_factory(), tiny_engine_factory(disable_radix_cache=True)


# Second prompts sharing with SYSTEM + [7] * 9: nothing, a partial page, one page, all pages.
SHARING = {
    "none": ([400 + i for i in range(40)], 0),
    "partial-page": (SYSTEM[:10] + [3] * 30, 0),
    "one-page": (SYSTEM[:PAGE] + [5] * 20, PAGE),
    "many-pages": (SYSTEM + [9] * 5, 3 * PAGE),
    "same-prompt": (SYSTEM + [7] * 9, 3 * PAGE),
    "page-aligned-prompt": (SYSTEM, 2 * PAGE),  # the last token is always computed
}


@pytest.mark.parametrize("case", list(SHARING))
def test_greedy_tokens_with_the_cache_equal_tokens_without(engines, case):
    cached, plain = engines
    cached.flush_cache()
    prompt, expected_cached = SHARING[case]
    answer(cached, f"{case}-first", SYSTEM + [7] * 9, greedy())
    got, num_cached = answer(cached, f"{case}-second", prompt, greedy())
    assert num_cached == expected_cached
    assert got == answer(plain, f"{case}-ref", prompt, greedy())[0]


def test_a_salted_request_shares_cached_pages_only_with_its_own_salt(engines):
    cached, plain = engines
    cached.flush_cache()
    prompt = SYSTEM + [8] * 9
    reference = answer(plain, "salt-ref", prompt, greedy())[0]

    def salted(rid: str, salt: str | None) -> int:
        outs = run(cached, Request(rid, prompt, greedy(), cache_salt=salt))[rid]
        assert tokens(outs) == reference
        return outs[-1].cached_tokens

    assert salted("plain", None) == 0
    assert salted("a", "tenant-a") == 0  # the unsalted pages are not tenant-a's
    assert salted("b", "tenant-b") == 0
    assert [salted(f"{s}-again", s) for s in ("tenant-a", "tenant-b", None)] == [3 * PAGE] * 3


def test_a_conversation_finds_its_history_turn_after_turn(engines):
    cached, plain = engines
    cached.flush_cache()
    prompt = list(SYSTEM)
    num_computed = 0  # by the previous turn: its last answer token's KV never was
    for turn in range(4):
        user = [50 + turn * 7 + i for i in range(11)]
        prompt = prompt + user
        got, num_cached = answer(cached, f"turn-{turn}", prompt, greedy(20))
        assert got == answer(plain, f"turn-ref-{turn}", prompt, greedy(20))[0]
        # Turn k+1 reuses turn k's prompt and answer, up to the last full computed page.
        assert num_cached == num_computed // PAGE * PAGE
        prompt = prompt + got
        num_computed = len(prompt) - 1


def test_a_page_whose_last_token_has_no_kv_yet_is_not_cached(engines):
    cached, plain = engines
    cached.flush_cache()
    first_prompt = SYSTEM + [6] * 4  # 52 tokens + 12 answer tokens: the 4th page is full,
    answer_ids, _ = answer(cached, "edge-first", first_prompt, greedy(12))  # but its last
    prompt = first_prompt + answer_ids + [5] * 10  # token was sampled, never computed
    got, num_cached = answer(cached, "edge-second", prompt, greedy())
    assert num_cached == 3 * PAGE
    assert got == answer(plain, "edge-ref", prompt, greedy())[0]


def test_seeded_sampling_is_the_same_with_the_cache(engines):
    cached, plain = engines
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=99, ignore_eos=True)
    answer(cached, "seed-warm", SYSTEM + [1], greedy(2))
    got, num_cached = answer(cached, "seeded", SYSTEM + [4] * 5, params)
    assert num_cached == 3 * PAGE
    assert got == answer(plain, "seeded-ref", SYSTEM + [4] * 5, params)[0]


def test_prompt_logprobs_still_owed_are_computed_not_taken_from_the_cache(engines):
    cached, plain = engines
    answer(cached, "lp-warm", SYSTEM + [2] * 3, greedy(2))

    def first(engine, rid):
        req = Request(rid, SYSTEM + [2] * 3, greedy(2), return_logprob=True, logprob_start_len=20)
        return run(engine, req)[rid][0]

    got, ref = first(cached, "lp"), first(plain, "lp-ref")
    assert got.cached_tokens == PAGE  # positions 19 on are computed for their logits
    assert got.prompt_logprobs == pytest.approx(ref.prompt_logprobs, abs=1e-5)


def test_a_pool_smaller_than_the_working_set_evicts_and_stays_exact(tiny_engine_factory):
    small = tiny_engine_factory(max_total_tokens=8 * PAGE)
    plain = tiny_engine_factory(disable_radix_cache=True)
    prompts = {f"p{i}": [i + 1] * (2 * PAGE) + SYSTEM[: PAGE + i] for i in range(6)}
    for rid, prompt in prompts.items():  # each leaves 3 or 4 pages cached: 8 cannot hold all
        assert answer(small, rid, prompt, greedy(8))[0] == answer(plain, rid, prompt, greedy(8))[0]
    assert small.prefix_cache.num_evicted_pages > 0
    assert small.num_free_pages == small.num_total_pages and small.num_used_pages == 0
    # A batch that needs every page evicts the whole cache rather than waiting for it.
    batch = [Request(f"b{i}", [200 + i] * (3 * PAGE), greedy(PAGE)) for i in range(2)]
    got = run(small, *batch)
    assert all(len(tokens(o)) == PAGE for o in got.values())


def test_preemption_under_pressure_keeps_outputs_exact(tiny_engine_factory):
    prompts = {f"q{i}": SYSTEM[i:] + SYSTEM[:i] for i in range(4)}
    plain = tiny_engine_factory(disable_radix_cache=True)
    expected = {rid: answer(plain, rid, p, greedy(40))[0] for rid, p in prompts.items()}
    tight = tiny_engine_factory(max_total_tokens=12 * PAGE)  # 4 x 6 pages wanted
    got = run(tight, *(Request(rid, p, greedy(40)) for rid, p in prompts.items()))
    assert {rid: tokens(o) for rid, o in got.items()} == expected
    assert tight.scheduler.num_preemptions > 0


def test_aborts_in_every_state_leave_only_unpinned_cache(tiny_engine_factory):
    engine = tiny_engine_factory(chunked_prefill_size=2 * PAGE)
    answer(engine, "warm", SYSTEM + [1], greedy(2))
    engine.add_request(Request("running", SYSTEM + [3], greedy(50)))
    engine.add_request(Request("sending", SYSTEM + [5], greedy(), prefill_only=True))
    engine.add_request(Request("prefilling", SYSTEM + [4] * 200, greedy()))
    engine.step()  # 1 + 1 + 30 tokens past the cached 48
    engine.add_request(Request("waiting", SYSTEM + [6], greedy()))
    assert engine.reserve(Request("for_kv", SYSTEM + [8], greedy()), use_cache=True)
    states = {rid: engine.get(rid).state for rid in ["running", "prefilling", "sending"]}
    assert states == {
        "running": ReqState.RUNNING,
        "prefilling": ReqState.PREFILLING,
        "sending": ReqState.SENDING_KV,
    }
    assert engine.flush_cache() == 0  # every cached page is pinned by someone
    for rid in ["running", "prefilling", "sending", "waiting", "for_kv"]:
        assert engine.abort(rid, "gone").finish_reason.type == "abort"
    assert engine.num_used_pages == 0 and engine.num_free_pages == engine.num_total_pages
    num_cached = engine.num_cached_pages
    assert num_cached == engine.num_evictable_pages == engine.allocator.num_used == 4
    assert engine.flush_cache() == num_cached
    assert engine.num_cached_pages == 0 and engine.allocator.num_free == engine.num_total_pages


def test_reserve_with_the_cache_pins_the_prefix_and_returns_only_new_pages(tiny_engine_factory):
    engine = tiny_engine_factory()
    answer(engine, "warm", SYSTEM + [1, 2], greedy(2))
    page_ids, num_cached = match_prefix(engine, SYSTEM + [9] * 20)
    assert (len(page_ids), num_cached) == (3, 3 * PAGE)
    assert match_prefix(engine, SYSTEM)[1] == 2 * PAGE  # at most prompt length - 1
    req = Request("d", SYSTEM + [9] * 20, greedy())
    new_page_ids = engine.reserve(req, use_cache=True)
    assert req.page_ids == page_ids + new_page_ids and len(new_page_ids) == 2
    assert req.cached_tokens == 3 * PAGE and engine.num_used_pages == 5
    assert engine.flush_cache() == 0  # pinned by the reservation
    plain = Request("p", SYSTEM + [9] * 20, greedy())
    assert len(engine.reserve(plain)) == 5 and plain.cached_tokens == 0  # the PD default
    engine.abort("d", "test")
    engine.abort("p", "test")
    assert engine.num_used_pages == 0


def test_disabled_cache_keeps_no_page(tiny_engine_factory):
    engine = tiny_engine_factory(disable_radix_cache=True)
    for rid in ("a", "b"):
        assert answer(engine, rid, SYSTEM + [1], greedy(4))[1] == 0
    assert engine.num_cached_pages == 0 and engine.allocator.num_used == 0
    assert match_prefix(engine, SYSTEM + [1]) == ([], 0)


def test_a_running_request_shares_its_prompt_pages_before_it_ends(engines, tiny_engine_factory):
    """Prompt pages enter the cache when they are computed, not when the request ends:
    a request arriving while the first still decodes (or sends its KV, or waits for
    decode's KV) starts from them."""
    cached, plain = engines
    engine = tiny_engine_factory()
    prompt = SYSTEM + [21] * 5
    engine.add_request(Request("long", prompt, greedy(40)))
    while engine.get("long").state is not ReqState.RUNNING:
        engine.step()
    engine.add_request(Request("later", SYSTEM + [22] * 7, greedy()))
    outs = []
    while not (outs and outs[-1].finish_reason):
        outs += [o for o in engine.step() if o.rid == "later"]
    assert outs[-1].cached_tokens == 3 * PAGE and engine.get("long").state is ReqState.RUNNING
    assert tokens(outs) == answer(plain, "later", SYSTEM + [22] * 7, greedy())[0]
    engine.flush_cache()  # what "later" left unpinned

    engine.add_request(Request("sending", SYSTEM + [23] * 20, greedy(), prefill_only=True))
    while engine.get("sending").state is not ReqState.SENDING_KV:
        engine.step()
    assert match_prefix(engine, SYSTEM + [23] * 20 + [1])[1] == 4 * PAGE
    assert engine.flush_cache() == 0  # pinned: by the sender and the decoding request
    engine.abort("sending", "test")
    assert engine.abort("long", "test") is not None
    assert engine.num_used_pages == 0


def test_decode_caches_a_prompt_as_soon_as_its_kv_arrives(tiny_engine_factory):
    engine = tiny_engine_factory()
    first = Request("first", SYSTEM + [31] * 4, greedy())
    assert len(engine.reserve(first, use_cache=True)) == 4
    assert match_prefix(engine, SYSTEM + [32])[1] == 0  # KV not here yet: nothing shared
    engine.admit_prefilled("first", first_token_id=5)
    assert match_prefix(engine, SYSTEM + [32])[1] == 3 * PAGE
    second = Request("second", SYSTEM + [32], greedy())
    assert len(engine.reserve(second, use_cache=True)) == 1 and second.cached_tokens == 3 * PAGE
    assert engine.num_used_pages == 5
    for rid in ("first", "second"):
        engine.abort(rid, "test")
    assert engine.num_used_pages == 0 and engine.num_evictable_pages == engine.num_cached_pages


def test_decode_knows_when_arriving_kv_extends_a_prompts_cached_prefix(tiny_engine_factory):
    engine = tiny_engine_factory()
    first = Request("first", SYSTEM + [41] * 20, greedy())
    assert engine.reserve(first, use_cache=True)
    sharing = Request("sharing", SYSTEM[: 2 * PAGE] + [42] * 9, greedy())
    one_page = Request("one-page", SYSTEM[:PAGE] + [43], greedy())  # PAGE + 1 tokens
    short = Request("short", SYSTEM[:PAGE], greedy())  # its one page is not matchable
    other = Request("other", [44] * 40, greedy())
    assert engine.prefix_arriving(sharing, [first]) and engine.prefix_arriving(one_page, [first])
    assert not engine.prefix_arriving(short, [first])
    assert not engine.prefix_arriving(other, [first]) and not engine.prefix_arriving(sharing, [])
    engine.admit_prefilled("first", first_token_id=5)
    assert not engine.prefix_arriving(sharing, [first])  # landed: the cache holds it now
    assert engine.reserve(sharing, use_cache=True) and sharing.cached_tokens == 2 * PAGE
    engine.abort("first", "test")
    engine.abort("sharing", "test")
    assert engine.num_used_pages == 0


def test_pages_a_transfer_may_still_write_stay_out_of_use_until_released(tiny_engine_factory):
    engine = tiny_engine_factory()
    answer(engine, "warm", SYSTEM + [1], greedy(2))
    req = Request("late-kv", SYSTEM + [51] * 40, greedy())
    new_page_ids = engine.reserve(req, use_cache=True)
    assert len(new_page_ids) == 3 and req.num_pinned_pages == 3
    pinned = req.page_ids[:3]
    engine.abort("late-kv", "deadline", keep_page_ids=new_page_ids[:2] + pinned)
    assert engine.num_used_pages == 5  # the two it may still write, and its cached pins
    others = [engine.reserve(Request(f"o{i}", [60 + i] * 20, greedy())) for i in range(6)]
    assert not set(new_page_ids[:2] + pinned) & {p for ids in others if ids for p in ids}
    for i in range(6):
        engine.abort(f"o{i}", "test")
    engine.release_pages(new_page_ids[:2] + [new_page_ids[2]])  # the third was freed already
    assert engine.num_used_pages == 3
    engine.release_pages(pinned)
    assert engine.num_used_pages == 0
    assert engine.allocator.num_free + engine.num_cached_pages == engine.num_total_pages


def test_prefill_pages_a_send_may_still_read_are_neither_reused_nor_evicted(tiny_engine_factory):
    """Prefill: a held prompt's pages are mostly cached (pinned) when its send is aborted;
    kept ones keep their pin, so no other prompt's prefill evicts and rewrites them."""
    engine = tiny_engine_factory()
    req = Request("sending", SYSTEM + [71] * 40, greedy())
    req.prefill_only = True
    engine.add_request(req)
    held = None
    while held is None:
        held = next((o.held_page_ids for o in engine.step() if o.rid == "sending"), None)
    assert req.num_pinned_pages >= 1
    engine.abort("sending", "client gone", keep_page_ids=held)
    assert engine.num_used_pages == len(held)
    others = [engine.reserve(Request(f"o{i}", [80 + i] * 30, greedy())) for i in range(20)]
    assert not set(held) & {p for ids in others if ids for p in ids}
    for i in range(20):
        engine.abort(f"o{i}", "test")
    engine.release_pages(held)
    assert engine.num_used_pages == 0
    assert engine.allocator.num_free + engine.num_cached_pages == engine.num_total_pages


def test_an_aborted_delta_send_keeps_the_prefix_under_its_pages_counted_used(tiny_engine_factory):
    """Prefill sends only the pages past the prefix decode holds (delta): when such a send is
    aborted, its kept pages pin their cached parents too. A parent nobody pins but whose
    child is pinned cannot be evicted, so it must not be counted free: every page the
    pool reports free can be had."""
    engine = tiny_engine_factory(max_total_tokens=12 * PAGE)
    req = Request("sending", SYSTEM + [71] * 40, greedy())  # 6 pages, 5 of them full
    req.prefill_only = True
    engine.add_request(req)
    held = None
    while held is None:
        held = next((o.held_page_ids for o in engine.step() if o.rid == "sending"), None)
    assert req.num_pinned_pages == 5
    delta = held[2:]  # decode held the first two pages
    engine.abort("sending", "decode gone", keep_page_ids=delta)
    assert engine.num_used_pages == len(held)
    num_free = engine.num_free_pages
    fill = Request("fill", [90 + i % 7 for i in range(num_free * PAGE - 1)], greedy(1))
    assert engine.reserve(fill) is not None
    engine.abort("fill", "test")
    engine.release_pages(delta)
    assert engine.num_used_pages == 0 and engine.num_evictable_pages == engine.num_cached_pages
    assert engine.allocator.num_free + engine.num_cached_pages == engine.num_total_pages
