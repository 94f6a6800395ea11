"""A server's `X-Request-Id` (vLLM's header) on a colocated tiny-random server: the client's
sane id, else the request's first rid, comes back on every answer of the generation routes,
whole, streamed or refused; the rids stay the server's to make."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serving.route_helpers import GREEDY

HEADER = "X-Request-Id"
CHAT = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES = {
    "/generate": {"text": "Hello", "sampling_params": GREEDY},
    "/v1/completions": {"model": "tiny-random", "prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": CHAT,
}


def post(server, path: str, body, request_id: str | None = None, **kwargs) -> requests.Response:
    headers = {HEADER: request_id} if request_id is not None else {}
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_id_comes_back_on_whole_and_streamed_answers(tiny_server, path, stream):
    body = {**ROUTES[path], "stream": stream}
    with post(tiny_server, path, body, "client-id:1", stream=stream) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers[HEADER] == "client-id:1"
        assert resp.content.rstrip().endswith(b"[DONE]" if stream else b"}")


def test_clients_may_send_one_id_on_requests_in_flight_together(tiny_server):
    """The id is not a rid: two requests under one id are two requests, not a duplicate."""
    body = {"text": "Hello", "sampling_params": {**GREEDY, "max_new_tokens": 32}}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(tiny_server, "/generate", body, "same"), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers[HEADER] for a in answers] == ["same", "same"]
    assert answers[0].json()["meta_info"]["id"] != answers[1].json()["meta_info"]["id"]


@pytest.mark.parametrize("garbage", [None, "two words", "x" * 129, "caf\xe9"])
def test_without_a_sane_header_the_first_rid_names_the_request(tiny_server, garbage):
    resp = post(tiny_server, "/generate", {"text": ["a", "b"], "rid": ["r-0", "r-1"]}, garbage)
    assert resp.status_code == 200 and resp.headers[HEADER] == "r-0"
    resp = post(tiny_server, "/generate", ROUTES["/generate"], garbage)
    assert resp.headers[HEADER] == resp.json()["meta_info"]["id"]
    resp = post(tiny_server, "/v1/chat/completions", {**CHAT, "n": 2, "rid": "chat"}, garbage)
    assert resp.status_code == 200 and resp.headers[HEADER] == "chat-0"


def test_refused_requests_carry_the_id_too(tiny_server):
    resp = requests.post(
        f"{tiny_server.url}/generate", data=b"{", headers={HEADER: "bad-json"}, timeout=60
    )
    assert resp.status_code == 400 and resp.headers[HEADER] == "bad-json"
    too_long = {**ROUTES["/generate"], "sampling_params": {"max_new_tokens": 10**9}}
    resp = post(tiny_server, "/generate", too_long, "too-long")
    assert resp.status_code == 400 and resp.headers[HEADER] == "too-long"
    resp = post(tiny_server, "/v1/completions", {"model": "nope", "prompt": "x"}, "no-model")
    assert resp.status_code == 404 and resp.headers[HEADER] == "no-model"
    # Refused before any rid was known, with no header: an id of the server's own.
    resp = requests.post(f"{tiny_server.url}/v1/chat/completions", data=b"[", timeout=60)
    assert resp.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", resp.headers[HEADER])
    # Only the generation routes answer with one.
    resp = requests.get(f"{tiny_server.url}/health", headers={HEADER: "h"}, timeout=60)
    assert resp.status_code == 200 and HEADER not in resp.headers
