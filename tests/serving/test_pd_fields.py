"""The PD fields of a request, parsed once (pure): every bad or missing field is one
PDFieldError naming it; good values land in the typed struct."""

from __future__ import annotations

import pytest

from pdserve.serving.pd_fields import (
    MAX_ROOM,
    PDFieldError,
    PDFields,
    RoomAddress,
    check_room,
    home_rank,
    parse_pd_fields,
    rooms_in_body,
)

ADDRESS = {"bootstrap_room": 7, "bootstrap_host": "10.0.0.2"}


def test_every_field_lands_in_the_struct():
    values = {
        "bootstrap_room": MAX_ROOM - 1,
        "bootstrap_host": "::1",
        "bootstrap_port": 8998,
        "disagg_prefill_dp_rank": 3,
        "routed_dp_rank": 1,
    }
    assert parse_pd_fields(values, dp_size=2, mode="decode") == PDFields(
        room=MAX_ROOM - 1,
        bootstrap_host="::1",
        bootstrap_port=8998,
        prefill_dp_rank=3,
        routed_dp_rank=1,
    )


def test_a_bracketed_ipv6_host_is_the_bare_address():
    """SGLang's router sends an IPv6 prefill URL's host with its brackets."""
    for host, bare in (("[::1]", "::1"), ("[fd00:0::11]", "fd00::11")):
        values = {**ADDRESS, "bootstrap_host": host}
        assert parse_pd_fields(values, 1, "decode").bootstrap_host == bare
        assert rooms_in_body(values) == [RoomAddress(7, bare)]


def test_absent_and_null_fields_are_none_on_a_colocated_server():
    assert parse_pd_fields({}, 1, "colocated") == PDFields()
    nulls = dict.fromkeys(["bootstrap_room", "bootstrap_port", "routed_dp_rank"])
    assert parse_pd_fields(nulls, 1, "colocated") == PDFields()


def test_data_parallel_rank_is_the_routed_rank_alias_and_ours_wins():
    assert parse_pd_fields({"data_parallel_rank": 1}, 2, "colocated").routed_dp_rank == 1
    both = {"routed_dp_rank": 0, "data_parallel_rank": 1}
    assert parse_pd_fields(both, 2, "colocated").routed_dp_rank == 0


BAD = [
    ("bootstrap_room", -1),
    ("bootstrap_room", MAX_ROOM),
    ("bootstrap_room", "12"),
    ("bootstrap_room", 1.5),
    ("bootstrap_room", True),
    ("bootstrap_room", [1]),
    ("bootstrap_host", 12),
    ("bootstrap_host", ""),
    ("bootstrap_host", ["h"]),
    ("bootstrap_host", "a" * 64),  # a DNS label is at most 63 characters
    ("bootstrap_host", "a..b"),
    ("bootstrap_host", "http://10.0.0.2"),
    ("bootstrap_host", "10.0.0.2:8998"),
    ("bootstrap_host", "[::1]:8998"),
    ("bootstrap_host", "[10.0.0.2]"),  # brackets hold IPv6 literals only
    ("bootstrap_host", "[host]"),
    ("bootstrap_host", "host name"),
    ("bootstrap_host", "host\nname"),
    ("bootstrap_host", "1"),  # legacy numeric IPv4 forms: the HTTP client refuses them
    ("bootstrap_host", "127.1"),
    ("bootstrap_host", "010.0.0.1"),
    ("bootstrap_host", "256.1.1.1"),
    ("bootstrap_port", 0),
    ("bootstrap_port", 65536),
    ("bootstrap_port", "8998"),
    ("bootstrap_port", True),
    ("disagg_prefill_dp_rank", "1"),
    ("disagg_prefill_dp_rank", 1.0),
    ("disagg_prefill_dp_rank", False),
    ("routed_dp_rank", 2),
    ("routed_dp_rank", -1),
    ("routed_dp_rank", "0"),
    ("routed_dp_rank", True),
    ("data_parallel_rank", 7),
    ("data_parallel_rank", 0.0),
]


@pytest.mark.parametrize("mode", ["colocated", "prefill", "decode"])
@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_every_bad_field_is_one_error_naming_it(mode, name, value):
    with pytest.raises(PDFieldError) as info:
        parse_pd_fields({**ADDRESS, name: value}, 2, mode)
    assert info.value.field == name
    assert name in info.value.message and repr(value) in info.value.message


@pytest.mark.parametrize(
    ("mode", "values", "name"),
    [
        ("prefill", {}, "bootstrap_room"),
        ("decode", {"bootstrap_host": "h"}, "bootstrap_room"),
        ("decode", {"bootstrap_room": 1}, "bootstrap_host"),
        ("decode", {"bootstrap_room": 1, "bootstrap_host": None}, "bootstrap_host"),
    ],
)
def test_what_a_pd_server_requires_is_one_error_naming_it(mode, values, name):
    with pytest.raises(PDFieldError) as info:
        parse_pd_fields(values, 1, mode)
    assert info.value.field == name and name in info.value.message
    assert mode in info.value.message


def test_the_prefill_rank_range_is_left_to_the_rank_rules():
    # Only the prefill server's dp_size bounds it; decode learns that later.
    assert parse_pd_fields({"disagg_prefill_dp_rank": -3}, 1, "colocated").prefill_dp_rank == -3


def test_a_prefill_server_needs_no_bootstrap_address():
    assert parse_pd_fields({"bootstrap_room": 0}, 1, "prefill") == PDFields(room=0)


def test_an_unknown_mode_is_a_programming_error():
    with pytest.raises(ValueError, match="mode"):
        parse_pd_fields({}, 1, "router")


def test_check_room_and_home_rank():
    assert check_room(0) == 0 and check_room(MAX_ROOM - 1) == MAX_ROOM - 1
    with pytest.raises(PDFieldError, match="bootstrap_room"):
        check_room(MAX_ROOM)
    assert [home_rank(room, 4) for room in (0, 5, 11, MAX_ROOM - 1)] == [0, 1, 3, 3]


def test_rooms_in_body_finds_the_rooms_of_a_request_rejected_for_any_field():
    body = {"bootstrap_room": 7, "bootstrap_host": "h", "bootstrap_port": 9, "routed_dp_rank": 99}
    assert rooms_in_body(body) == [RoomAddress(7, "h", 9)]


def test_rooms_in_body_pairs_list_entries_and_skips_malformed_ones():
    body = {
        "bootstrap_room": [1, "x", -1, 2],
        "bootstrap_host": "h",
        "bootstrap_port": [5, 6, 7, 0],
    }
    assert rooms_in_body(body) == [RoomAddress(1, "h", 5), RoomAddress(2, "h", None)]
    body = {"bootstrap_room": [1, 2], "bootstrap_host": ["a", "b", "c"]}  # wrong length
    assert rooms_in_body(body) == [RoomAddress(1), RoomAddress(2)]
    assert rooms_in_body({"bootstrap_room": True}) == []
    assert rooms_in_body(["not", "a", "dict"]) == []


def test_local_prefill_on_decode_needs_no_bootstrap_fields_and_allows_none():
    local = {"disagg_local_prefill": True, "routed_dp_rank": 1}
    assert parse_pd_fields(local, 2, "decode") == PDFields(routed_dp_rank=1, local_prefill=True)
    assert parse_pd_fields({"disagg_local_prefill": False, **ADDRESS}, 1, "decode").room == 7
    for extra in ({"bootstrap_room": 7}, {"bootstrap_host": "10.0.0.2"}):
        with pytest.raises(PDFieldError) as err:
            parse_pd_fields({"disagg_local_prefill": True, **extra}, 1, "decode")
        assert err.value.field == "disagg_local_prefill"


def test_local_prefill_is_refused_by_prefill_and_must_be_a_boolean():
    for values, mode in (
        ({"disagg_local_prefill": True, "bootstrap_room": 7}, "prefill"),
        ({"disagg_local_prefill": 1}, "decode"),
    ):
        with pytest.raises(PDFieldError) as err:
            parse_pd_fields(values, 1, mode)
        assert err.value.field == "disagg_local_prefill"


def test_one_room_for_several_items_names_room_plus_index_of_each():
    """SGLang's rule, which the items follow (request_parse.item_pd_fields): a rejected
    request with one room and n samples or several prompts names every item's room."""
    top = 2**63 - 1
    body = {"bootstrap_room": top, "bootstrap_host": "h", "n": 2, "prompt": ["a", "b"]}
    assert [r.room for r in rooms_in_body(body)] == [top, 0, 1, 2]
    assert [r.room for r in rooms_in_body({"bootstrap_room": 5, "input_ids": [1, 2]})] == [5]
    text = {"bootstrap_room": 5, "text": ["a", "b"]}
    assert [r.room for r in rooms_in_body(text)] == [5, 6]


def test_a_body_claiming_countless_items_names_a_bounded_number_of_rooms():
    """A rejected body is searched for rooms on the server's event loop: n = 2**63 (found by
    the HTTP fuzz test on a lone prefill leg) had held the loop, and the server, for good."""
    from pdserve.serving.pd_fields import MAX_REPORTED_ITEMS

    body = {"bootstrap_room": 5, "prompt": "x", "n": 2**63, "temperature": [1]}
    rooms = rooms_in_body(body)
    assert len(rooms) == MAX_REPORTED_ITEMS and rooms[:2] == [RoomAddress(5), RoomAddress(6)]


def test_one_room_per_prompt_with_n_names_prompt_room_plus_sample_of_each():
    """SGLang's router sends one room (and host, port) per prompt for a completions prompt
    list with `n`: a rejected request names room + j for sample j of each prompt, as its
    items take them (request_parse.item_pd_fields)."""
    top = 2**63 - 1
    body = {"bootstrap_room": [10, top], "bootstrap_host": ["a", "b"], "n": 2, "prompt": ["x", "y"]}
    assert rooms_in_body(body) == [
        RoomAddress(10, "a"),
        RoomAddress(11, "a"),
        RoomAddress(top, "b"),
        RoomAddress(0, "b"),
    ]
