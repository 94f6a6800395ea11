"""Pure cores: batch sizes, prompts, and the bodies sent to each leg."""

import msgspec
import pytest

from pdserve.router.body import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    BadRequest,
    LegPlan,
    abort_rids,
    encode_bodies,
    new_rids,
    num_sequences,
    prompt_of,
    shape_bodies,
)


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        (GENERATE, {"text": "hi"}, None),
        (GENERATE, {"text": ["a", "b", "c"]}, 3),
        (GENERATE, {"input_ids": [1, 2, 3]}, None),
        (GENERATE, {"input_ids": [[1, 2], [3]]}, 2),
        (GENERATE, {"text": "hi", "n": 4}, None),  # native n is not a batch
        (COMPLETIONS, {"prompt": "hi"}, None),
        (COMPLETIONS, {"prompt": [5, 6, 7]}, None),
        (COMPLETIONS, {"prompt": ["a", "b"]}, 2),
        (COMPLETIONS, {"prompt": ["a", "b"], "n": 3}, 6),  # one room per sequence
        (COMPLETIONS, {"prompt": "a", "n": 2}, 2),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, None),
        (CHAT, {"messages": [], "n": 1}, None),
        (CHAT, {"messages": [], "n": 3}, 3),
    ],
)
def test_num_sequences_per_route(route, body, expected):
    assert num_sequences(route, body) == expected


@pytest.mark.parametrize("body", [{"text": []}, {"input_ids": []}])
def test_empty_batches_are_rejected_naming_the_field(body):
    with pytest.raises(BadRequest) as refused:
        num_sequences(GENERATE, body)
    assert refused.value.param == next(iter(body))


def test_bad_n_is_rejected():
    with pytest.raises(BadRequest):
        num_sequences(CHAT, {"messages": [], "n": 0})


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_n_above_the_servers_limit_is_rejected_before_any_room_is_drawn(route):
    """A fuzzed n of 10**9 once kept the router drawing rooms at 100% CPU for good."""
    with pytest.raises(BadRequest, match=r"n must be in \[1, 128\]"):
        num_sequences(route, {"messages": [], "prompt": "a", "n": 10**9})
    assert num_sequences(route, {"messages": [], "prompt": "a", "n": 128}) == 128


def test_prompt_of_each_route():
    assert prompt_of(GENERATE, {"text": ["first", "second"]}) == "first"
    assert prompt_of(GENERATE, {"input_ids": [[4, 5], [6]]}) == [4, 5]
    assert prompt_of(COMPLETIONS, {"prompt": "p"}) == "p"
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "u"}]},
    ]
    assert prompt_of(CHAT, {"messages": messages}) == "system:s\nuser:u\n"


def plan(num_seqs=None, rooms=(7,), prefill_rank=None, decode_rank=None):
    return LegPlan("10.0.0.5", 8998, list(rooms), num_seqs, "rid-1", prefill_rank, decode_rank)


def test_single_request_gets_scalar_fields_and_one_shared_body():
    body = {"text": "hi", "bootstrap_room": 123, "sampling_params": {"temperature": 0}}
    prefill, decode = shape_bodies(body, plan())
    assert prefill is decode
    assert prefill["bootstrap_host"] == "10.0.0.5" and prefill["bootstrap_port"] == 8998
    assert prefill["bootstrap_room"] == 7  # the client's room is replaced
    assert prefill["rid"] == "rid-1" and prefill["sampling_params"] == {"temperature": 0}
    assert body["bootstrap_room"] == 123  # the client's body is not mutated


def test_batch_gets_one_room_per_item_and_lists_for_host_and_port():
    prefill, _ = shape_bodies({"text": ["a", "b"]}, plan(num_seqs=2, rooms=(1, 2)))
    assert prefill["bootstrap_room"] == [1, 2]
    assert prefill["bootstrap_host"] == ["10.0.0.5"] * 2
    assert prefill["bootstrap_port"] == [8998, 8998]


def test_null_bootstrap_port_is_sent_as_null():
    p = LegPlan("h", None, [3], None, "r")
    prefill, _ = shape_bodies({"text": "x"}, p)
    assert "bootstrap_port" in prefill and prefill["bootstrap_port"] is None


def test_dp_aware_bodies_carry_the_ranks_and_differ():
    body = {"text": "x", "data_parallel_rank": 5}
    prefill, decode = shape_bodies(body, plan(prefill_rank=1, decode_rank=3))
    assert prefill["routed_dp_rank"] == 1 and prefill["disagg_prefill_dp_rank"] == 1
    assert decode["routed_dp_rank"] == 3 and decode["disagg_prefill_dp_rank"] == 1
    assert "data_parallel_rank" not in prefill and "data_parallel_rank" not in decode
    assert prefill["bootstrap_room"] == decode["bootstrap_room"] == 7


def test_align_room_sends_the_clients_routed_rank_to_prefill_only():
    """--align-room reads a client's routed rank as a prefill rank; on decode it would name
    a decode worker (a decode server with fewer ranks refused the request)."""
    body = {"text": "x", "routed_dp_rank": 2, "data_parallel_rank": 2, "disagg_prefill_dp_rank": 2}
    p = LegPlan("h", 8998, [5], None, "r", client_rank_prefill_only=True)
    prefill, decode = shape_bodies(body, p)
    assert prefill["routed_dp_rank"] == prefill["data_parallel_rank"] == 2
    assert "routed_dp_rank" not in decode and "data_parallel_rank" not in decode
    assert decode["disagg_prefill_dp_rank"] == prefill["disagg_prefill_dp_rank"] == 2
    assert decode["bootstrap_room"] == prefill["bootstrap_room"] == 5
    # Without a rank from the client both legs share one body, as before.
    prefill, decode = shape_bodies({"text": "x"}, p)
    assert prefill is decode


@pytest.mark.parametrize(
    "raw",
    [
        b'{"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0}}  \n',
        b"{ }",
        b'{"text": ["a", "b"], "data_parallel_rank": 5}',  # a rank field: encoded anew
        b'{"text": "x", "bootstrap_room": 123, "rid": "mine"}',  # router fields: encoded anew
    ],
)
@pytest.mark.parametrize("ranks", [(None, None), (0, 3), "prefill_only"])
def test_encoded_bodies_equal_the_shaped_ones(raw, ranks):
    body = msgspec.json.decode(raw)
    num_seqs = 2 if isinstance(body.get("text"), list) else None
    rooms = (7, 8)[: num_seqs or 1]
    if ranks == "prefill_only":  # --align-room: a client's routed rank reaches prefill only
        p = LegPlan("10.0.0.5", 8998, list(rooms), num_seqs, "r", client_rank_prefill_only=True)
    else:
        p = plan(num_seqs, rooms, *ranks)
    prefill_data, decode_data = encode_bodies(raw, body, p)
    prefill, decode = shape_bodies(body, p)
    assert msgspec.json.decode(prefill_data) == prefill
    assert msgspec.json.decode(decode_data) == decode
    assert (prefill_data is decode_data) == (prefill is decode)


def test_client_bytes_are_kept_when_the_router_adds_fields_only():
    raw = b'{"input_ids": [1,2,3],"x":  "kept as sent"}'
    prefill_data, _ = encode_bodies(raw, msgspec.json.decode(raw), plan())
    assert prefill_data.startswith(raw[:-1] + b",")


def test_generated_rids_name_every_sequence():
    assert len(new_rids(3)) == 3 and isinstance(new_rids(None), str)


def test_abort_targets_the_rids_the_server_derives():
    assert abort_rids(CHAT, "r", 2) == ["r-0", "r-1"]
    assert abort_rids(GENERATE, ["a", "b"], 2) == ["a", "b"]
    assert abort_rids(COMPLETIONS, "r", None) == ["r"]
    assert abort_rids(GENERATE, "r", 2) == ["r_0", "r_1"]  # SGLang's names for a batch
    assert abort_rids(GENERATE, "r", None) == ["r"]


def test_a_body_is_decoded_as_the_servers_decode_it():
    import codecs
    import gzip
    import zlib

    from pdserve.router.content_coding import MAX_DECODED_BYTES, UnsupportedCoding, decoded_body

    body = b'{"text": "hi"}'
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for data, coding in [
        (gzip.compress(body), "gzip"),
        (gzip.compress(body), " GZIP "),
        (zlib.compress(body), "deflate"),
        (raw_deflate.compress(body) + raw_deflate.flush(), "deflate"),  # aiohttp takes it
        (codecs.BOM_UTF8 + body, None),
        (body, "identity"),
        (body, "x-unknown"),  # aiohttp passes codings it does not know
    ]:
        assert decoded_body(data, coding) == body, coding
    for data, coding, status in [
        (b"\x1f\x8b not gzip", "gzip", 400),
        (gzip.compress(body)[:-12], "gzip", 400),  # cut short
        (body, "br", 415),
        (body, "zstd", 415),
        (gzip.compress(b" " * (MAX_DECODED_BYTES + 1), 1), "gzip", 413),  # a bomb
    ]:
        with pytest.raises((BadRequest, UnsupportedCoding)) as refused:
            decoded_body(data, coding)
        assert refused.value.status == status, (coding, refused.value)
