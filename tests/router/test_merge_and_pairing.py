"""Pure cores: reading worker answers, merging prompt logprobs, choosing a pair and rooms."""

import json
import random

import pytest

from pdserve.engine.page_hash import page_hashes, salted_seed
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.merge import (
    EchoStreamMerger,
    SSEBuffer,
    StreamMerger,
    error_details,
    error_message,
    merge_echo_response,
    merge_response,
    prefill_echo_logprobs,
    prefill_prompt_fields,
)
from pdserve.router.pairing import NoWorker, PairChooser
from pdserve.router.workers import WorkerRegistry
from pdserve.serving.cache_salt import salt_key


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "room in flight", "code": 400}}', "room in flight"),
        (b'{"error": "plain string"}', "plain string"),
        (b'{"detail": "fastapi style"}', "fastapi style"),
        (b"Internal Server Error", "Internal Server Error"),
        (b"", "HTTP 502"),
    ],
)
def test_error_message_of_every_shape(body, expected):
    assert error_message(body, 502) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "m", "type": "NotFoundError", "param": "model", "code": 404}}',
            ("NotFoundError", "model", None),
        ),
        (
            b'{"error": {"message": "m", "type": "server_error", "param": null}}',
            ("server_error", None, None),
        ),
        (
            b'{"error": {"message": "m", "type": "server_error", "origin": "prefill"}}',
            ("server_error", None, "prefill"),
        ),
        (b'{"error": {"message": "m", "type": 3, "param": ["x"], "origin": 1}}', (None,) * 3),
        (b'{"error": "plain string"}', (None, None, None)),
        (b"[1]", (None, None, None)),
        (b"Internal Server Error", (None, None, None)),
    ],
)
def test_error_details_relays_only_string_type_param_and_origin(body, expected):
    assert error_details(body) == expected


def test_sse_buffer_reassembles_events_split_anywhere():
    stream = b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        buf = SSEBuffer()
        events = buf.feed(stream[:cut]) + buf.feed(stream[cut:])
        assert events == [b'data: {"a": 1}\n\n', b'data: {"a": 2}\n\n', b"data: [DONE]\n\n"]
        assert buf.rest() == b""


def answer(prompt_lps, index=None):
    out = {
        "text": "x",
        "meta_info": {
            "input_token_logprobs": prompt_lps,
            "output_token_logprobs": [[-0.1, 5, None]],
        },
    }
    if index is not None:
        out["index"] = index
    return out


def test_prefill_prompt_logprobs_go_in_front_for_single_and_batch():
    prefill = json.dumps(answer([[None, 1, None], [-1.5, 2, None]])).encode()
    fields = prefill_prompt_fields(prefill, streamed=False)
    merged = json.loads(merge_response(json.dumps(answer([])).encode(), fields))
    assert merged["meta_info"]["input_token_logprobs"] == [[None, 1, None], [-1.5, 2, None]]
    assert merged["meta_info"]["output_token_logprobs"] == [[-0.1, 5, None]]

    batch = json.dumps([answer([[None, 1, None]]), answer([[None, 7, None]])]).encode()
    merged = json.loads(
        merge_response(
            json.dumps([answer([]), answer([])]).encode(),
            prefill_prompt_fields(batch, streamed=False),
        )
    )
    assert [m["meta_info"]["input_token_logprobs"][0][1] for m in merged] == [1, 7]


def test_answers_without_logprobs_pass_through_unchanged():
    body = b'{"text": "x", "meta_info": {"id": "r"}}'
    assert merge_response(body, {0: {"input_token_logprobs": [[None, 1, None]]}}) == body
    assert merge_response(body, {}) is body


def test_streamed_events_get_prefill_fields_by_batch_index():
    prefill = (
        b"".join(
            b"data: " + json.dumps(answer([[None, tok, None]], index=i)).encode() + b"\n\n"
            for i, tok in ((0, 10), (1, 11))
        )
        + b"data: [DONE]\n\n"
    )
    merger = StreamMerger(prefill_prompt_fields(prefill, streamed=True))
    for index, tok in ((1, 11), (0, 10), (1, 11)):  # every event, in any order
        event = b"data: " + json.dumps(answer([], index=index)).encode() + b"\n\n"
        merged = json.loads(merger.process(event)[6:])
        assert merged["meta_info"]["input_token_logprobs"] == [[None, tok, None]]
    assert merger.process(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def echo_choice(index, tokens, logprobs):
    tops = [None if lp is None else {t: lp} for t, lp in zip(tokens, logprobs, strict=True)]
    lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": []}
    return {"index": index, "text": "".join(tokens), "logprobs": lp}


def test_echo_merge_fills_decodes_null_prompt_logprobs_from_prefills_choice():
    """Decode echoes the prompt with null logprobs; prefill's choice of the same index has
    them: filled position by position while the tokens agree, never over decode's own."""
    prefill = {
        "choices": [
            echo_choice(1, ["a", "b", "c", "x"], [None, -1.0, -2.0, -0.5]),
            echo_choice(0, ["a", "d", "e"], [None, -3.0, -0.1]),
        ]
    }
    decode = {
        "choices": [
            echo_choice(0, ["a", "d", "e", "f"], [None, None, -0.2, -0.3]),
            echo_choice(1, ["a", "b", "q", "x"], [None, None, None, -0.4]),
        ]
    }
    fields = prefill_echo_logprobs(json.dumps(prefill).encode(), streamed=False)
    merged = json.loads(merge_echo_response(json.dumps(decode).encode(), fields))["choices"]
    assert merged[0]["logprobs"]["token_logprobs"] == [None, -3.0, -0.2, -0.3]
    assert merged[0]["logprobs"]["top_logprobs"][:2] == [None, {"d": -3.0}]
    assert merged[1]["logprobs"]["token_logprobs"] == [None, -1.0, None, -0.4]  # "q" != "c"
    odd = b'{"choices": [{"index": [0], "logprobs": {"tokens": 3}}, 7]}'
    assert merge_echo_response(odd, fields) == odd
    assert merge_echo_response(odd, prefill_echo_logprobs(odd, streamed=False)) == odd


def test_echo_stream_merge_fills_only_each_choices_first_chunk():
    prefill = b"".join(
        b"data: " + json.dumps({"choices": [echo_choice(i, ["a", "b"], [None, lp])]}).encode()
        + b"\n\n"
        for i, lp in ((0, -1.0), (1, -2.0), (0, -9.0))
    ) + b"data: [DONE]\n\n"  # fmt: skip
    merger = EchoStreamMerger(prefill_echo_logprobs(prefill, streamed=True))
    for index, want in ((1, -2.0), (0, -1.0), (0, None)):
        event = {"choices": [echo_choice(index, ["a", "b"], [None, None])]}
        merged = json.loads(merger.process(b"data: " + json.dumps(event).encode() + b"\n\n")[6:])
        assert merged["choices"][0]["logprobs"]["token_logprobs"] == [None, want]
    assert merger.process(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def registry_with(config, prefill_dp=1, decode_dp=1, healthy=True):
    registry = WorkerRegistry(config)
    p = registry.new_worker(
        WorkerSpec("http://10.0.0.1:30000", "prefill", 8998), dp_size=prefill_dp, healthy=healthy
    )
    d = registry.new_worker(
        WorkerSpec("http://10.0.0.2:30001", "decode"), dp_size=decode_dp, healthy=healthy
    )
    registry.add(p)
    registry.add(d)
    return registry


def test_align_room_draws_rooms_on_the_chosen_prefill_rank():
    config = RouterConfig(align_room=True)
    registry = registry_with(config, prefill_dp=3)
    chooser = PairChooser(config, registry, random.Random(0))
    seen = set()
    for _ in range(300):
        pair = chooser.choose("/generate", {"text": ["a", "b"]}, 2, "a", now=0.0)
        assert pair.plan.prefill_rank is None  # align-room alone sets no rank field
        assert all(room % 3 == pair.prefill_rank for room in pair.plan.rooms)
        seen.add(pair.prefill_rank)
    assert seen == {0, 1, 2}


def test_align_room_draws_rooms_on_the_rank_the_client_routed_to():
    """Outside --dp-aware the client's routed_dp_rank reaches prefill, which serves the room
    there: a room drawn on the router's own pick conflicted with it (follow_bootstrap_room)."""
    config = RouterConfig(align_room=True)
    registry = registry_with(config, prefill_dp=3)
    chooser = PairChooser(config, registry, random.Random(0))
    for field in ("routed_dp_rank", "data_parallel_rank"):
        for rank in (2, 2, 0, 1, 1, 0, 2, 0, 1) * 5:  # not the router's round robin
            pair = chooser.choose("/generate", {"text": "a", field: rank}, None, "a", now=0.0)
            assert pair.prefill_rank == rank and pair.plan.rooms[0] % 3 == rank
    seen = set()  # a list of ranks (a batch), or one out of range: the router's own pick
    for ranks in ([2, 2], 3, -1, True, "1"):
        for _ in range(30):
            body = {"text": ["a", "b"], "routed_dp_rank": ranks}
            pair = chooser.choose("/generate", body, 2, "a", now=0.0)
            assert all(room % 3 == pair.prefill_rank for room in pair.plan.rooms)
            seen.add(pair.prefill_rank)
    assert seen == {0, 1, 2}


def test_align_room_with_kv_aware_draws_rooms_on_the_rank_holding_the_prompt():
    """Without --dp-aware the room names the prefill rank; it was the router's load pick,
    so a prompt cached on one rank of the server kv_aware chose was computed again on
    another one time in two (7 of 14 repeated prompts hit with prefill DP 2)."""
    config = RouterConfig(align_room=True, policy="kv_aware")
    registry = registry_with(config, prefill_dp=3)
    chooser = PairChooser(config, registry, random.Random(0))
    prompt = list(range(100, 180))
    hashes = page_hashes(prompt, 16, 7)
    chooser.kv_index.track("http://10.0.0.1:30000", 16, 7).load_snapshot(
        {"seq": 1, "ranks": [[], hashes, []]}
    )
    for _ in range(6):
        pair = chooser.choose("/generate", {"input_ids": prompt}, None, prompt, now=0.0)
        assert (pair.prefill_rank, pair.plan.rooms[0] % 3) == (1, 1)
        assert pair.prefill_matched_tokens == 64
    body = {"input_ids": prompt, "routed_dp_rank": 2}  # the client's rank still wins
    assert chooser.choose("/generate", body, None, prompt, now=0.0).prefill_rank == 2


def test_local_prefill_needs_a_decode_rank_to_name():
    """The index may hold ranks past the DP size the router knows for a server (started again
    with more ranks, its /get_load not yet read): a match there has no rank to name, and
    went local without routed_dp_rank, to a rank the server picks (without the prompt)."""
    config = RouterConfig(policy="kv_aware", local_prefill_threshold=32)
    chooser = PairChooser(config, registry_with(config, decode_dp=2), random.Random(0))
    prompt = list(range(100, 180))
    hashes = page_hashes(prompt, 16, 7)
    cache = chooser.kv_index.track("http://10.0.0.2:30001", 16, 7)
    cache.load_snapshot({"seq": 1, "ranks": [[], [], hashes]})
    pair = chooser.choose("/generate", {"input_ids": prompt}, None, prompt, now=0.0)
    assert not pair.local_prefill and pair.prefill is not None
    cache.load_snapshot({"seq": 2, "ranks": [[], hashes, hashes]})
    pair = chooser.choose("/generate", {"input_ids": prompt}, None, prompt, now=0.0)
    assert (pair.local_prefill, pair.decode_rank) == (True, 1)


def test_dp_aware_plan_names_both_ranks_and_the_prefill_bootstrap():
    config = RouterConfig(dp_aware=True)
    registry = registry_with(config, prefill_dp=2, decode_dp=4)
    chooser = PairChooser(config, registry, random.Random(0))
    pair = chooser.choose("/v1/chat/completions", {"messages": []}, None, None, now=0.0)
    plan = pair.plan
    assert plan.prefill_rank in (0, 1) and plan.decode_rank in range(4)
    assert (plan.bootstrap_host, plan.bootstrap_port) == ("10.0.0.1", 8998)
    assert isinstance(plan.rid, str) and plan.rid.startswith("pdr-")
    assert pair.prefill.url.endswith(":30000") and pair.decode.url.endswith(":30001")


def test_no_healthy_worker_is_a_clear_error_and_a_failed_worker_is_avoided():
    config = RouterConfig()
    with pytest.raises(NoWorker, match="no healthy prefill server"):
        PairChooser(config, registry_with(config, healthy=False), random.Random(0)).choose(
            "/generate", {"text": "x"}, None, "x", now=0.0
        )
    registry = registry_with(config)
    registry.add(registry.new_worker(WorkerSpec("http://10.0.0.3:30000", "prefill"), healthy=True))
    chooser = PairChooser(config, registry, random.Random(0))
    for _ in range(4):
        pair = chooser.choose(
            "/generate", {"text": "x"}, None, "x", 0.0, avoid={"http://10.0.0.1:30000"}
        )
        assert pair.prefill.url == "http://10.0.0.3:30000"


def test_servers_a_just_started_router_has_not_checked_are_not_said_to_fail_checks():
    """A router (re)started under load answers before its first checks pass; it told those
    clients that every server was failing its health checks."""
    config = RouterConfig()
    registry = registry_with(config, healthy=False)
    registry.add(registry.new_worker(WorkerSpec("http://10.0.0.3:30000", "prefill")))
    chooser = PairChooser(config, registry, random.Random(0))
    with pytest.raises(NoWorker, match=r"\(2 registered, 2 not health-checked yet\)$"):
        chooser.choose("/generate", {"text": "x"}, None, "x", now=0.0)
    registry.get("http://10.0.0.3:30000").health.record(False)
    why = r"\(2 registered, 1 not health-checked yet, 1 failing health checks\)$"
    with pytest.raises(NoWorker, match=why):
        chooser.choose("/generate", {"text": "x"}, None, "x", now=0.0)


def test_a_probing_decode_server_is_used_when_no_other_is_available():
    """Decode server 2 passes its health checks but its breaker is half-open with a probe in
    flight; decode server 1 is unhealthy. Requests go to server 2, not to a 503; an open
    breaker still keeps its server out, and a closed one is preferred to a probing one."""
    config = RouterConfig(cb_failure_threshold=1, cb_open_s=10.0)
    registry = registry_with(config)
    probing = registry.new_worker(WorkerSpec("http://10.0.0.4:30001", "decode"), healthy=True)
    registry.add(probing)
    probing.on_done(0.0, False, None)  # opens its breaker until t=10
    probing.on_dispatch(10.0, 0, None)  # the probe: half-open, in flight
    assert not probing.available(10.0)
    chooser = PairChooser(config, registry, random.Random(0))
    decodes = {chooser.choose("/generate", {"text": "x"}, None, "x", 10.0).decode.url
               for _ in range(4)}  # fmt: skip
    assert decodes == {"http://10.0.0.2:30001"}  # the closed one while it is healthy
    registry.get("http://10.0.0.2:30001").health.healthy = False
    assert chooser.choose("/generate", {"text": "x"}, None, "x", 10.0).decode is probing
    probing.on_done(10.5, False, None)  # the probe failed: open again until t=20.5
    # The message tells the two reasons apart: one server fails its health checks, the other
    # passes them but its breaker is open (it read "(2 registered)" alone).
    why = r"\(2 registered, 1 failing health checks, 1 with an open circuit breaker .* 9.5 s\)"
    with pytest.raises(NoWorker, match=f"no healthy decode server available {why}"):
        chooser.choose("/generate", {"text": "x"}, None, "x", 11.0)


@pytest.mark.parametrize(
    "policies", [{}, {"policy": "cache_aware"}, {"decode_policy": "round_robin"}]
)
def test_a_local_prefill_threshold_without_kv_aware_decode_is_refused(policies):
    """It was accepted and did nothing: only kv_aware knows what a decode server holds."""
    with pytest.raises(ValueError, match="--local-prefill-threshold needs the kv_aware"):
        RouterConfig(local_prefill_threshold=64, **policies)
    RouterConfig(local_prefill_threshold=64, policy="round_robin", decode_policy="kv_aware")
    RouterConfig(local_prefill_threshold=64, policy="kv_aware")


def test_kv_aware_scores_a_request_under_the_salt_its_body_names():
    """cache_salt and extra_key, combined as the servers combine them (serving/cache_salt.py);
    a body whose salt the servers refuse is routed by load alone."""
    config = RouterConfig(policy="kv_aware")
    chooser = PairChooser(config, registry_with(config), random.Random(0))
    prompt = list(range(100, 180))
    hashes = page_hashes(prompt, 16, salted_seed(7, salt_key("tenant", "key")))
    for url in ("http://10.0.0.1:30000", "http://10.0.0.2:30001"):
        chooser.kv_index.track(url, 16, 7).load_snapshot({"seq": 1, "ranks": [hashes]})
    cases = [
        ({"cache_salt": "tenant", "extra_key": "key"}, 64),
        ({}, 0),
        ({"cache_salt": "tenant"}, 0),
        ({"extra_key": "key"}, 0),
        ({"cache_salt": 5, "extra_key": "key"}, 0),
    ]
    for fields, matched in cases:
        pair = chooser.choose("/generate", {"input_ids": prompt, **fields}, None, prompt, 0.0)
        assert (pair.prefill_matched_tokens, pair.decode_matched_tokens) == (matched,) * 2, fields


def test_cache_aware_scores_a_request_under_the_salt_its_body_names():
    """The body's salt reaches cache_aware: after the prompt was served unsalted on one
    worker, the salted prompt goes by load, then to the worker that served it salted."""
    config = RouterConfig(policy="cache_aware", prefix_block_len=4, cache_threshold=0.5)
    registry = WorkerRegistry(config)
    a, b = (
        registry.new_worker(WorkerSpec(f"http://10.0.0.{i}:30000", "regular"), healthy=True)
        for i in (1, 2)
    )
    registry.add(a)
    registry.add(b)
    chooser = PairChooser(config, registry, random.Random(0))
    prompt = list(range(100, 140))

    def worker(loads: tuple[int, int], **salt) -> str:
        a.set_reported_load([loads[0]])
        b.set_reported_load([loads[1]])
        body = {"input_ids": prompt, **salt}
        return chooser.choose("/generate", body, None, prompt, 0.0).decode.spec.url

    assert worker((10, 0)) == b.spec.url
    assert worker((0, 10), extra_key="tenant") == a.spec.url
    assert worker((10, 0), cache_salt="tenant") == a.spec.url
    assert worker((10, 0), cache_salt="tenant", extra_key="k") == b.spec.url  # another salt
