"""The router's `X-Request-Id` against scripted stub workers (which record the header of
every leg and abort they receive): the client's id, or one the router makes, reaches both
legs of every attempt and their aborts, and comes back on every answer."""

from __future__ import annotations

import re

import pytest
import requests

from tests.helpers import wait_until
from tests.router.conftest import start_router
from tests.router.test_router_shell import pd_args, sse_events

pytestmark = pytest.mark.timeout(120)
HEADER = "X-Request-Id"


@pytest.fixture(scope="module")
def router(stubs):
    args = pd_args(stubs, prefills=("p1", "p2"), decodes=("d1",)) + ["--retry-backoff-s", "0.01"]
    with start_router(args) as r:
        yield r


def post(router, body: dict, request_id: str | None = None, **kwargs) -> requests.Response:
    headers = {HEADER: request_id} if request_id is not None else {}
    return requests.post(f"{router.url}/generate", json=body, headers=headers, timeout=10, **kwargs)


def leg_ids(stubs, *names: str) -> list[str | None]:
    return [i for name in names for i in stubs[name].log()["request_ids"]]


@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_id_reaches_both_legs_and_comes_back(stubs, router, stream):
    with post(router, {"text": "x", "stream": stream}, "trace-42.a/b", stream=stream) as resp:
        assert resp.status_code == 200 and resp.headers[HEADER] == "trace-42.a/b"
        if stream:
            assert [e["text"] for e in sse_events(resp)] == ["from d1 0", "from d1 1"]
    assert leg_ids(stubs, "p1", "p2") == ["trace-42.a/b"]
    assert leg_ids(stubs, "d1") == ["trace-42.a/b"]
    # The header names the request; the rid stays the router's own, unique per attempt.
    assert stubs["d1"].log()["bodies"][0]["rid"] != "trace-42.a/b"


def test_without_a_header_the_router_makes_one_per_request(stubs, router):
    ids = [post(router, {"text": "x"}).headers[HEADER] for _ in range(2)]
    assert ids[0] != ids[1] and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert leg_ids(stubs, "d1") == ids
    assert sorted(leg_ids(stubs, "p1", "p2")) == sorted(ids)


@pytest.mark.parametrize("garbage", ["has space", "x" * 129, "caf\xe9", "tab\there"])
def test_a_header_that_is_not_a_sane_id_is_replaced_not_refused(stubs, router, garbage):
    resp = post(router, {"text": "x"}, garbage)
    assert resp.status_code == 200
    made = resp.headers[HEADER]
    assert made != garbage and re.fullmatch(r"[0-9a-f]{32}", made)
    assert leg_ids(stubs, "d1") == [made] and leg_ids(stubs, "p1", "p2") == [made]


def test_retries_keep_the_id_and_the_warning_names_it(stubs, router):
    body = {"text": "x", "stub": {"p1": {"status": 503}, "d1": {"delay_s": 0.3}}}
    for n in range(2):  # round robin: one of the two starts on p1, which fails
        resp = post(router, body, f"retried-{n}")
        assert resp.status_code == 200 and resp.headers[HEADER] == f"retried-{n}"
    failed = stubs["p1"].log()["request_ids"]
    assert len(failed) >= 1
    assert sorted(failed + stubs["p2"].log()["request_ids"]) == sorted(
        failed + ["retried-0", "retried-1"]
    )
    n = failed[0][-1]
    line = f"attempt 1 of /generate failed: prefill {stubs['p1'].url}: p1 scripted failure"
    assert f"{line} [request_id=retried-{n}]" in router.output()


def test_errors_carry_the_id_and_so_do_the_aborts_of_the_other_leg(stubs, router):
    body = {"text": "x", "stub": {"p1": {"hold": "never"}, "p2": {"hold": "never"}}}
    body["stub"]["d1"] = {"status": 400}
    resp = post(router, body, "failed-7")
    assert resp.status_code == 400 and resp.headers[HEADER] == "failed-7"
    prefill = next(name for name in ("p1", "p2") if stubs[name].log()["bodies"])
    wait_until(lambda: stubs[prefill].log()["aborts"], 5, "prefill abort")
    assert stubs[prefill].log()["abort_request_ids"] == ["failed-7"]
    # Answers the router makes itself carry it too.
    resp = requests.post(
        f"{router.url}/v1/completions", data=b"{", headers={HEADER: "bad-1"}, timeout=10
    )
    assert resp.status_code == 400 and resp.headers[HEADER] == "bad-1"


def test_a_mid_stream_error_event_comes_on_a_stream_that_has_the_id(stubs, router):
    body = {"text": "x", "stream": True, "stub": {"d1": {"chunks": 3, "error_after": 1}}}
    with post(router, body, "stream-err", stream=True) as resp:
        assert resp.status_code == 200 and resp.headers[HEADER] == "stream-err"
        assert "error" in sse_events(resp)[-1]
    assert leg_ids(stubs, "d1") == ["stream-err"]
