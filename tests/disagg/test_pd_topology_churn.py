"""A prefill server restarted on the same ports with other settings (--dp-size, rank rule,
page size) under a live decode server: what decode learnt of the earlier start (its server
info, cached 30 s) must not decide a request on the new one. A leg that decode refused on
that info drops it (the operator may restart prefill to cure the refusal), and a refusal or
an answer that stale info explains is decided again on info fetched anew."""

from __future__ import annotations

import concurrent.futures
import signal

import pytest
import requests

from tests.disagg.conftest import TINY, Prefill
from tests.disagg.pd_driver import get_load, metric_value, pd_generate, random_room, wait_idle
from tests.helpers import free_port, launch_server, wait_until

BODY = {
    "input_ids": list(range(10, 50)),
    "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
}
FORCE = {"PDSERVE_FORCE_QUERY_PREFILL_DP_RANK": "1"}
QUERIES = "pdserve_rank_query_round_trips_total"


@pytest.fixture(scope="module")
def decode(pd_module):
    """One decode for both tests: each restarts a prefill on ports of its own, and what
    decode caches is kept per bootstrap address."""
    return pd_module.decode(1, args=["--bootstrap-timeout-s", "15"])


def _start_prefill(pd, port: int, bootstrap_port: int, dp_size: int, args=(), env=None):
    server = launch_server(
        [*TINY, "--mode", "prefill", "--dp-size", str(dp_size)]
        + ["--bootstrap-port", str(bootstrap_port), *args],
        port=port,
        env=env,
        extra_ready_urls=[f"http://127.0.0.1:{bootstrap_port}/route"],
    )
    pd.started.append(server)
    return Prefill(server, bootstrap_port)


def _kill(prefill: Prefill) -> None:
    prefill.server.signal_group(signal.SIGKILL)
    prefill.server.proc.wait(timeout=10)


def _local_tokens(decode_url: str) -> list[int]:
    """The answer decode computes itself (no prefill leg): a colocated server's tokens."""
    resp = requests.post(
        decode_url + "/generate", json=dict(BODY, disagg_local_prefill=True), timeout=30
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def _check_served(prefill: Prefill, decode_url: str, expected: list[int], **kw) -> None:
    result = pd_generate(
        prefill.url, decode_url, BODY, bootstrap_port=prefill.bootstrap_port, timeout_s=60, **kw
    )
    assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
    assert result.decode.body["output_ids"] == expected


def test_a_prefill_restarted_compatible_is_used_after_decode_refused_its_earlier_start(pd, decode):
    port, bootstrap_port = free_port(), free_port()
    prefill = _start_prefill(pd, port, bootstrap_port, 1, ["--page-size", "8"])
    expected = _local_tokens(decode.url)
    refused = pd_generate(prefill.url, decode.url, BODY, bootstrap_port=bootstrap_port)
    assert refused.decode.status == 500, refused.decode.body
    assert "page_size: decode=16 prefill=8" in refused.decode.error
    _kill(prefill)
    # Restarted as it should have been: decode must not refuse it on the info of the
    # earlier start, which it held for 30 s.
    prefill = _start_prefill(pd, port, bootstrap_port, 1)
    _check_served(prefill, decode.url, expected)
    wait_idle([prefill.url, decode.url])


def test_a_prefill_restarted_with_another_dp_size_and_rank_rule_is_resolved_anew(pd, decode):
    """Decode learnt `dp_size=2, registers_all_rooms` from a querying leg that never got a
    KV connection (its prefill leg never came); the server died and came back with 3 ranks
    on the fast path. A request naming rank 2 is not refused as out of range, and one that
    names none goes to room mod 3 instead of asking (for the bootstrap timeout) about a
    room the new server never registers."""
    port, bootstrap_port = free_port(), free_port()
    prefill = _start_prefill(pd, port, bootstrap_port, 2, env=FORCE)
    queries_before = metric_value(decode.url, QUERIES)
    expected = _local_tokens(decode.url)
    leg = dict(BODY, bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port, bootstrap_room=7)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, decode.url + "/generate", json=leg, timeout=60)
        wait_until(
            lambda: metric_value(decode.url, QUERIES) > queries_before,
            20,
            "decode to ask for the rank of the room",
        )
        _kill(prefill)
        lost = pending.result(timeout=30)
    assert lost.status_code == 503, lost.text
    prefill = _start_prefill(pd, port, bootstrap_port, 3)
    _check_served(
        prefill,
        decode.url,
        expected,
        room=random_room(),
        prefill_extra={"routed_dp_rank": 2, "disagg_prefill_dp_rank": 2},
        decode_extra={"disagg_prefill_dp_rank": 2},
    )
    for room in (3 * 1000 + 1, 3 * 1000 + 2):  # neither on rank 0: the old single guess
        _check_served(prefill, decode.url, expected, room=room)
    wait_idle([prefill.url, decode.url])


def _kv_peers(decode_url: str) -> int:
    return sum(rank["num_kv_peers"] for rank in get_load(decode_url))


def test_decode_stops_dialing_prefill_workers_that_are_gone(pd):
    """Each prefill start listens for KV on new ports. Decode dialed every KV endpoint it
    ever used for good (ZeroMQ redials every 100 ms): each prefill restart left its workers
    in decode's peer table and socket. A lost peer no request uses any more is dropped."""
    port, bootstrap_port = free_port(), free_port()
    prefill = _start_prefill(pd, port, bootstrap_port, 2)
    decode = pd.decode(1)
    expected = _local_tokens(decode.url)
    for room in (2000, 2001):  # one on each prefill worker (room mod 2)
        _check_served(prefill, decode.url, expected, room=room)
    wait_until(lambda: _kv_peers(decode.url) == 2, 10, "decode to report its 2 KV peers")
    _kill(prefill)
    prefill = _start_prefill(pd, port, bootstrap_port, 2)
    for room in (2002, 2003):
        _check_served(prefill, decode.url, expected, room=room)
    wait_until(lambda: _kv_peers(decode.url) == 2, 10, "the 2 workers of the first start dropped")
    _kill(prefill)
    wait_until(lambda: _kv_peers(decode.url) == 0, 10, "every KV peer dropped")
    wait_idle([decode.url])
