"""The rank-resolution matrix over real servers: every load-balance method x FORCE (none,
prefill, decode, both) x routing fields, the same on both legs or on one leg only. Each cell
returns the colocated tokens, or fails on both legs within 2 s with the specified message
(a rejection on one leg fails the other). No cell hangs."""

from __future__ import annotations

import itertools
import random

import pytest
import requests

from pdserve.disagg.bootstrap_registry import MAX_ROOMS_PER_QUERY
from tests.disagg.pd_driver import metric_value, pd_generate_async, run_many, wait_idle

DP = 2
METHODS = ["follow_bootstrap_room", "round_robin", "shortest_queue", "total_tokens"]
BODY = {
    "input_ids": [5, 17, 99, 23, 42, 7, 8, 200, 31, 64, 12, 77, 3, 150, 9, 10, 11, 12],
    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
}
FAIL_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def want(tiny_server) -> list[int]:
    return requests.post(tiny_server.url + "/generate", json=BODY, timeout=60).json()["output_ids"]


@pytest.fixture(scope="module")
def decodes(pd_module) -> dict[bool, object]:
    """Decode servers without and with FORCE (SGLang's variable name, to test the alias)."""
    return {
        False: pd_module.decode(DP),
        True: pd_module.decode(DP, env={"SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK": "1"}),
    }


@pytest.fixture(
    scope="module",
    params=list(itertools.product(METHODS, [False, True])),
    ids=lambda p: f"{p[0]}-force{int(p[1])}",
)
def prefill(request, pd_module):
    method, force = request.param
    env = {"PDSERVE_FORCE_QUERY_PREFILL_DP_RANK": "1"} if force else None
    server = pd_module.prefill(DP, ["--load-balance-method", method], env=env)
    yield method, force, server
    server.server.stop()


# Fields sent to one leg only: the other leg must fail as fast, with the same reason.
ONE_LEG_CASES = {
    "routed_out_of_range_on_prefill": ({"routed_dp_rank": DP}, {}),
    "routed_out_of_range_on_decode": ({}, {"data_parallel_rank": DP}),
    "bad_sampling_on_prefill": ({"sampling_params": {"temperature": -1}}, {}),
    "bad_sampling_on_decode": ({}, {"sampling_params": {"top_p": 0}}),
}


def _cells(rng: random.Random):
    """(case, room, prefill extra fields, decode extra fields)."""
    for case in [
        "none",
        "routed_home",
        "routed_other",
        "explicit_right",
        "explicit_right_other",
        "explicit_wrong",
        "explicit_out_of_range",
    ]:
        room = rng.randrange(2**63)
        home, other = room % DP, (room % DP + 1) % DP
        fields = {
            "none": {},
            "routed_home": {"routed_dp_rank": home},
            "routed_other": {"routed_dp_rank": other},
            "explicit_right": {"routed_dp_rank": home, "disagg_prefill_dp_rank": home},
            "explicit_right_other": {"data_parallel_rank": other, "disagg_prefill_dp_rank": other},
            "explicit_wrong": {"routed_dp_rank": other, "disagg_prefill_dp_rank": home},
            "explicit_out_of_range": {"disagg_prefill_dp_rank": DP},
        }[case]
        yield case, room, fields, fields
    for case, (prefill_fields, decode_fields) in ONE_LEG_CASES.items():
        yield case, rng.randrange(2**63), prefill_fields, decode_fields
    # The legs name different prefill ranks: decode's page list goes to one worker, the
    # request to another (each had waited there for the other until its deadline).
    room = rng.randrange(2**63)
    home, other = room % DP, (room % DP + 1) % DP
    prefill_fields = {"routed_dp_rank": other, "disagg_prefill_dp_rank": other}
    yield "legs_name_different_ranks", room, prefill_fields, {"disagg_prefill_dp_rank": home}


def _expected_error(case: str, method: str, force_prefill: bool) -> str | None:
    if case.startswith("routed_out_of_range"):
        return f"_rank={DP} out of range: dp_size is {DP}"
    if case.startswith("bad_sampling"):
        return "invalid sampling_params"
    if case == "explicit_out_of_range":
        return "out of range"
    if case == "explicit_wrong":
        return "disagg_prefill_dp_rank"
    if case == "legs_name_different_ranks":
        return "name different prefill ranks"
    if case == "routed_other" and method == "follow_bootstrap_room" and not force_prefill:
        return "follow_bootstrap_room conflict: dispatched to dp_rank"
    return None


def _run_legs(server, decode_url: str, body: dict, legs: list[tuple[int, dict, dict]]) -> list:
    """Both legs of each (room, prefill fields, decode fields), all at once."""
    return run_many(
        lambda s: [
            pd_generate_async(
                s,
                server.url,
                decode_url,
                body,
                bootstrap_port=server.bootstrap_port,
                room=room,
                prefill_extra=prefill_fields,
                decode_extra=decode_fields,
                timeout_s=30,
            )
            for room, prefill_fields, decode_fields in legs
        ]
    )


@pytest.mark.parametrize("force_decode", [False, True], ids=["decode-noforce", "decode-force"])
def test_rank_matrix_cell_outcomes(prefill, decodes, want, force_decode):
    method, force_prefill, server = prefill
    decode = decodes[force_decode]
    cells = list(_cells(random.Random(f"{method}-{force_prefill}-{force_decode}")))
    results = _run_legs(server, decode.url, BODY, [cell[1:] for cell in cells])
    for (case, room, fields, decode_fields), result in zip(cells, results, strict=True):
        where = f"{case} room={room} prefill fields={fields} decode fields={decode_fields}"
        expected = _expected_error(case, method, force_prefill)
        if expected is None:
            assert result.prefill.ok, f"{where}: prefill {result.prefill.error}"
            assert result.decode.ok, f"{where}: decode {result.decode.error}"
            assert result.decode.body["output_ids"] == want, where
            continue
        for leg in (result.prefill, result.decode):
            assert 400 <= leg.status < 600, f"{where}: {leg.status} {leg.body}"
            assert expected in leg.error, f"{where}: {leg.error}"
            assert leg.elapsed_s < FAIL_WITHIN_S, f"{where}: took {leg.elapsed_s:.2f}s"
        if case == "routed_other" or case.endswith("_on_prefill"):
            assert result.decode.error == result.prefill.error, "decode must see the same reason"
    wait_idle([server.url, decode.url])


def test_zero_new_tokens_needs_no_rank_once_the_prefill_leg_ended(prefill, decodes):
    """Prompt logprobs only (max_new_tokens 0) move no KV: the decode leg answers at once,
    though its prefill leg ended first and no longer publishes the room's rank to query."""
    _, _, server = prefill
    room = random.Random(f"zero-{server.url}").randrange(2**63)
    leg = dict(
        BODY,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        bootstrap_host="127.0.0.1",
        bootstrap_port=server.bootstrap_port,
        bootstrap_room=room,
    )
    first = requests.post(server.url + "/generate", json=leg, timeout=60)
    assert first.status_code == 200, first.text
    answer = requests.post(decodes[False].url + "/generate", json=leg, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_ids"] == []
    wait_idle([server.url, decodes[False].url])


def test_zero_new_tokens_on_another_rank_is_served_on_both_legs(prefill, decodes):
    """A max_new_tokens 0 request routed off its room's home rank (or naming another prefill
    rank than it was dispatched to, or none that exists) moves no KV, and its decode leg answers 200 at once: the
    prefill leg must answer 200 too, not a rank conflict the decode leg never hears of."""
    _, _, server = prefill
    rng = random.Random(f"zero-other-{server.url}")
    cases = []
    # The last names a prefill rank that does not exist: decode cannot tell without a query
    # it makes only to find KV, so its 200 is the answer on both legs
    for fields in (
        {"routed_dp_rank": 1},
        {"routed_dp_rank": 1, "disagg_prefill_dp_rank": 0},
        {"disagg_prefill_dp_rank": DP + 3},
    ):
        room = rng.randrange(2**63) // DP * DP  # home rank 0
        cases.append((room, fields))
    body = dict(BODY, sampling_params={"max_new_tokens": 0}, return_logprob=True)
    results = _run_legs(server, decodes[False].url, body, [(r, f, f) for r, f in cases])
    for (room, fields), result in zip(cases, results, strict=True):
        where = f"room={room} fields={fields}"
        assert result.prefill.status == 200, f"{where}: prefill {result.prefill.error}"
        assert result.decode.status == 200, f"{where}: decode {result.decode.error}"
        assert result.decode.body["output_ids"] == []
    wait_idle([server.url, decodes[False].url])


@pytest.fixture(scope="module")
def decode_dp1(pd_module):
    """A decode server of one worker, shared by the fast- and query-path tests: they count
    its metrics from what they read before their requests."""
    return pd_module.decode(1)


def _decode_counts(url: str) -> dict[str, float]:
    counts = {
        path: metric_value(url, "pdserve_rank_resolutions_total", {"path": path})
        for path in ("fast_path", "query")
    }
    counts["round_trips"] = metric_value(url, "pdserve_rank_query_round_trips_total")
    counts["query_rooms"] = metric_value(url, "pdserve_rank_query_rooms_total")
    for stage in ("decode_bootstrap", "decode_kv_wait", "decode_total"):
        labels = {"stage": stage}
        counts[stage] = metric_value(url, "pdserve_disagg_stage_seconds_count", labels)
    return counts


def _counted_since(url: str, before: dict[str, float]) -> dict[str, float]:
    after = _decode_counts(url)
    return {name: after[name] - before[name] for name in before}


def test_fast_path_makes_no_rank_queries(pd, decode_dp1):
    """follow_bootstrap_room without FORCE: decode never asks the bootstrap server."""
    prefill = pd.prefill(DP)
    decode = decode_dp1
    before = _decode_counts(decode.url)
    results = run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port
            )
            for _ in range(8)
        ]
    )
    assert all(r.decode.ok for r in results), [r.decode.error for r in results]
    wait_idle([prefill.url, decode.url])
    counted = _counted_since(decode.url, before)
    assert counted["fast_path"] == 8
    assert counted["round_trips"] == 0
    # Every request's stages were timed once on each leg (the TTFT breakdown of issue 21).
    for stage in ("decode_bootstrap", "decode_kv_wait", "decode_total"):
        assert counted[stage] == 8, stage
    for url, stages in (
        (prefill.url, ("prefill_compute", "prefill_page_list_wait", "prefill_send")),
        (decode.url, ("decode_bootstrap", "decode_kv_wait", "decode_total")),
    ):
        for stage in stages:
            labels = {"stage": stage}
            if url == prefill.url:
                assert metric_value(url, "pdserve_disagg_stage_seconds_count", labels) == 8, stage
            assert metric_value(url, "pdserve_disagg_stage_seconds_sum", labels) >= 0, stage


def test_query_path_batches_rooms(pd, decode_dp1):
    """Under FORCE every room is registered and queried; concurrent rooms share queries."""
    prefill = pd.prefill(DP, ["--force-query-prefill-dp-rank"])
    decode = decode_dp1
    before = _decode_counts(decode.url)
    results = run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port
            )
            for _ in range(16)
        ]
    )
    assert all(r.decode.ok for r in results), [r.decode.error for r in results]
    wait_idle([prefill.url, decode.url])
    counted = _counted_since(decode.url, before)
    assert counted["query"] == 16
    assert counted["query_rooms"] >= 16


def test_more_rooms_than_one_rank_query_takes_are_asked_in_several(pd, decode_dp1):
    """A decode leg whose pending rooms outnumber what one /query_dp_ranks takes (4096, a
    batch of that many prompts, or as many legs at once) asks in several queries. One query
    of them all was refused (400) and every room failed at once with a 502 naming the
    refusal: here the room whose prefill leg failed must fail with that leg's reason."""
    prefill = pd.prefill(DP, ["--force-query-prefill-dp-rank"])
    num_rooms = MAX_ROOMS_PER_QUERY + 4
    first_room = random.Random("many-rooms").randrange(2**62)
    failed = {
        "bootstrap_room": first_room + num_rooms - 1,
        "error": "the leg failed",
        "status": 409,
    }
    bootstrap = f"http://127.0.0.1:{prefill.bootstrap_port}"
    assert requests.post(bootstrap + "/register_dp_rank", json=failed, timeout=10).ok
    round_trips = metric_value(decode_dp1.url, "pdserve_rank_query_round_trips_total")
    leg = {
        "input_ids": [[5, 6, 7]] * num_rooms,
        "sampling_params": {"max_new_tokens": 1},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": first_room,  # item i has room first_room + i
    }
    resp = requests.post(decode_dp1.url + "/generate", json=leg, timeout=60)
    assert resp.status_code == 409 and "the leg failed" in resp.text, resp.text
    assert metric_value(decode_dp1.url, "pdserve_rank_query_round_trips_total") >= round_trips + 2
    wait_idle([prefill.url, decode_dp1.url])


def test_unequal_dp_sizes_resolve_the_prefill_rank_by_the_prefills_dp_size(pd, decodes, want):
    """Prefill DP 3, decode DP 2: home(R) is R mod 3 on both legs (never decode's R mod 2),
    a decode rank names a decode worker only, and each cell returns the colocated tokens or
    fails on both legs with its reason."""
    prefill, decode = pd.prefill(3), decodes[False]
    rng = random.Random("unequal-dp")
    cells = []
    for home in (0, 1, 2):  # one room per prefill rank, each on either decode rank
        room = rng.randrange(2**62) // 6 * 6 + home
        cells += [(room, {}, {}, None), (room + 3, {"routed_dp_rank": home}, {}, None)]
    room = rng.randrange(2**62) // 3 * 3 + 1  # home 1
    cells += [
        (room, {"routed_dp_rank": 2}, {}, "follow_bootstrap_room conflict"),
        (room + 3, {"routed_dp_rank": 2, "disagg_prefill_dp_rank": 2},
         {"disagg_prefill_dp_rank": 2, "routed_dp_rank": 1}, None),
        (room + 6, {"routed_dp_rank": 2, "disagg_prefill_dp_rank": 2},
         {"disagg_prefill_dp_rank": 2, "routed_dp_rank": 2}, "routed_dp_rank=2 out of range"),
        (room + 9, {"disagg_prefill_dp_rank": 3}, {"disagg_prefill_dp_rank": 3}, "out of range"),
        (room + 12, {"routed_dp_rank": 2, "disagg_prefill_dp_rank": 2},
         {"disagg_prefill_dp_rank": 1}, "name different prefill ranks"),
    ]  # fmt: skip
    results = _run_legs(prefill, decode.url, BODY, [cell[:3] for cell in cells])
    for (room, fields, decode_fields, expected), result in zip(cells, results, strict=True):
        where = f"room={room} (home {room % 3}) prefill {fields} decode {decode_fields}"
        if expected is None:
            assert result.prefill.ok and result.decode.ok, (where, result)
            assert result.decode.body["output_ids"] == want, where
            continue
        for leg in (result.prefill, result.decode):
            assert 400 <= leg.status < 600 and expected in leg.error, (where, leg)
            assert leg.elapsed_s < FAIL_WITHIN_S, (where, leg.elapsed_s)
    wait_idle([prefill.url, decode.url])
