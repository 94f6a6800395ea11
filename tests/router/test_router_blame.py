"""Which server the router blames for a failed leg, against scripted stub workers: the one a
retry avoids, the one whose circuit breaker counts it, the one the client's error names."""

from __future__ import annotations

import pytest
import requests

from tests.router.conftest import router_args
from tests.router.test_router_shell import metric

pytestmark = pytest.mark.timeout(120)
# Long enough for cache_aware to send a prompt back to the workers that served it (3 blocks).
PROMPT = "a prompt that fills three blocks of sixteen characters"


def legs_by_worker(router, stubs, names) -> dict[str, float]:
    return {
        name: metric(router, "pdserve_router_worker_requests_total", worker=stubs[name].url)
        for name in names
    }


@pytest.mark.parametrize(
    ("relayer", "origin"),
    [("decode", "prefill"), ("prefill", "decode")],
    ids=["by-decode", "by-prefill"],
)
def test_a_retry_avoids_the_peer_an_error_is_marked_as_caused_by(
    stubs, router_factory, relayer, origin
):
    """A server relays a fault of its peer (`origin`): decode a failure of its prefill
    server, prefill its decode's (no page list in time). The retry must avoid the peer at
    fault and may go back to the server that relayed it. It avoided the relaying server:
    the retry went back to the faulty peer, and a sound server was kept out of it.
    cache_aware sends the retry to the servers of the first attempt unless avoided."""
    args = router_args(
        prefills=[(stubs["p1"].url, 8998), (stubs["p2"].url, 8999)],
        decodes=[stubs["d1"].url, stubs["d2"].url],
    )
    router = router_factory(args + ["--policy", "cache_aware", "--retry-backoff-s", "0.01"])
    relayers, peers = (("d1", "d2"), ("p1", "p2"))
    if relayer == "prefill":
        relayers, peers = peers, relayers
    failure = {"status": 503, "origin": origin, "times": 1}  # the first answer of each
    script = {name: failure for name in relayers}
    if relayer == "prefill":  # decode answers after prefill, as a real one does
        script |= {name: {"delay_s": 0.3} for name in peers}
    resp = requests.post(f"{router.url}/generate", json={"text": PROMPT, "stub": script})
    assert resp.status_code == 200, resp.text
    assert metric(router, "pdserve_router_retries_total") == 1
    # The relaying server served both attempts; the peer at fault, only the first.
    assert sorted(legs_by_worker(router, stubs, relayers).values()) == [0, 2]
    assert sorted(legs_by_worker(router, stubs, peers).values()) == [1, 1]


def test_a_whole_answer_cut_by_the_request_deadline_leaves_decode_in_rotation(
    stubs, router_factory
):
    """The router's own deadline ends a non-streamed decode leg: decode may still be
    computing a long answer, so no verdict (one failure opens the breaker here). It counted
    (only a cut stream did not), and a sound decode server was out for --cb-open-s."""
    args = ["--request-timeout-s", "1", "--cb-failure-threshold", "1", "--max-retries", "0"]
    router = router_factory(router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url]) + args)
    body = {"text": "x", "stub": {"d1": {"hold": "never"}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 504 and "deadline" in resp.json()["error"]["message"], resp.text
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "closed"
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_deadline_with_both_legs_silent_blames_decode(stubs, router_factory, stream):
    """Both legs run until the router's deadline (a frozen decode worker: prefill's leg
    waits for its page list). Prefill's leg, sent first, timed out first, and the client
    read `prefill server failed`: the decode leg, which the client waits on, is named."""
    args = ["--request-timeout-s", "1", "--max-retries", "0"]
    router = router_factory(router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url]) + args)
    script = {"p1": {"hold": "never"}, "d1": {"hold": "never"}}
    body = {"text": "x", "stream": stream, "stub": script}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    error = resp.json()["error"]
    assert resp.status_code == 504, resp.text
    assert error["message"] == "decode server failed: no answer before the request deadline"
    assert error["worker"] == {"url": stubs["d1"].url, "role": "decode"}


def test_a_decode_error_event_mid_stream_counts_against_decode(stubs, router_factory):
    """Decode's own error event after the stream started (a worker that exited): the client
    gets it as it came, and decode's breaker (one failure opens it here) counts it. It
    counted as a success: a decode server failing every stream midway stayed in rotation."""
    args = ["--cb-failure-threshold", "1", "--max-retries", "0"]
    router = router_factory(router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url]) + args)
    body = {"text": "x", "stream": True, "stub": {"d1": {"chunks": 3, "error_after": 1}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 200 and "d1 failed mid-stream" in resp.text, resp.text
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "open"
    assert workers[stubs["p1"].url]["circuit"] == "closed"
    failures = metric(router, "pdserve_router_worker_failures_total", worker=stubs["d1"].url)
    assert failures == 1
