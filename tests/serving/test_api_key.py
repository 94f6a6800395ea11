"""--api-key on a server: every route but /health needs `Authorization: Bearer <key>`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from aiohttp import web

from pdserve.serving import admin_api, native_api, openai_api, tokenize_api
from tests.helpers import http_json, launch_server, raw_exchange, wait_until

KEY = "sk-test-123"


def server_routes() -> list[tuple[str, str]]:
    """Every (method, path) the server's front end serves, read from its route tables."""
    app = web.Application()
    for module in (admin_api, native_api, openai_api, tokenize_api):
        module.add_routes(app)
    routes = set()
    for route in app.router.routes():
        method = "POST" if route.method in ("*", "POST") else route.method
        if method != "HEAD":
            routes.add((method, route.resource.canonical))
    return sorted(routes)


ROUTES = server_routes()
BODIES = {
    "/generate": {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}},
    "/v1/completions": {"model": "tiny-random", "prompt": [5, 6], "max_tokens": 1},
    "/v1/chat/completions": {
        "model": "tiny-random",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    },
    "/abort_request": {"rid": "nobody"},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [5, 6]},
}
URLS = {"/v1/models/{model}": "/v1/models/tiny-random"}  # a route's path with its parameter


@pytest.fixture(scope="module", params=["flag", "env"])
def server(request) -> Iterator:
    """A colocated tiny-random server whose key comes from the flag or PDSERVE_API_KEY."""
    if request.param == "flag":
        proc = launch_server(["--model-path", "tiny-random", "--api-key", KEY])
    else:
        proc = launch_server(["--model-path", "tiny-random"], env={"PDSERVE_API_KEY": KEY})
    with proc:
        yield proc


def test_every_route_is_listed():
    assert ("GET", "/health") in ROUTES and ("POST", "/generate") in ROUTES
    assert len(ROUTES) >= 10


@pytest.mark.parametrize("method, path", [r for r in ROUTES if r[1] != "/health"])
def test_a_protected_route_needs_the_key(server, method, path):
    body = BODIES.get(path) if method == "POST" else None
    url = server.url + URLS.get(path, path)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, answer = http_json(method, url, body, headers=headers)
        assert status == 401, (headers, answer)
        assert answer["error"]["type"] == "authentication_error"
        assert "Bearer" in answer["error"]["message"]
    status, answer = http_json(method, url, body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, answer


def test_health_is_open_and_refusals_are_counted(server):
    """Refuses a request itself: run alone, it found no refusal counted and failed."""
    assert http_json("GET", server.url + "/health")[0] == 200
    assert http_json("GET", server.url + "/get_load")[0] == 401
    status, text = http_json(
        "GET", server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200
    line = next(x for x in text.splitlines() if x.startswith("pdserve_auth_refusals_total{"))
    assert 'kind="api_key"' in line and float(line.split()[-1]) >= 1


def test_a_key_with_bytes_past_ascii_is_a_401_not_a_500(server):
    # aiohttp decodes a header's non-UTF-8 bytes to lone surrogates; the compare must cope.
    status, answer = http_json(
        "GET", server.url + "/get_load", headers={"Authorization": f"Bearer {KEY}\u00e9"}
    )
    assert status == 401 and answer["error"]["type"] == "authentication_error", answer


def test_a_refusal_names_the_bearer_scheme_it_wants(server):
    """RFC 9110 11.6.1: a 401 carries WWW-Authenticate, as the router's now does too."""
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.get(server.url + "/get_load", headers=headers, timeout=10)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"


def test_a_refused_generation_request_still_carries_its_request_id(server):
    resp = requests.post(
        server.url + "/generate",
        json=BODIES["/generate"],
        headers={"X-Request-Id": "no-key"},
        timeout=10,
    )
    assert resp.status_code == 401 and resp.headers["X-Request-Id"] == "no-key"


LOGGED = "refused a malformed HTTP request from 127.0.0.1: "


@pytest.mark.parametrize(
    "line",
    [f"Bearer {KEY}\x01".encode(), f"Bearer {KEY}".encode() + b"A" * 9000],
    ids=["control-byte", "too-long"],
)
def test_a_malformed_authorization_line_never_puts_the_key_in_the_log(server, line):
    """aiohttp refused such a line with a 400 and logged it at ERROR with a traceback that
    quoted the raw line, key included."""
    seen = server.output().count(LOGGED)
    head = b"GET /get_load HTTP/1.1\r\nHost: x\r\nAuthorization: " + line
    answer = raw_exchange(server.url, head + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer
    wait_until(lambda: server.output().count(LOGGED) > seen, 10, "the one-line log record")
    assert KEY not in server.output() and "Traceback" not in server.output()


def test_a_browser_page_may_call_it_and_its_preflight_needs_no_key(server):
    """vLLM and SGLang allow any origin by default; the preflight was a 401 here (no key:
    browsers send none with it), and no answer allowed the page's origin, so a web client
    working against them failed against pdserve."""
    page = {"Origin": "http://page.example"}
    preflight = requests.options(
        server.url + "/v1/chat/completions",
        headers={
            **page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    body = {**BODIES["/v1/chat/completions"], "stream": True}
    for key, status in [({}, 401), ({"Authorization": f"Bearer {KEY}"}, 200)]:
        url = server.url + "/v1/chat/completions"
        with requests.post(
            url, json=body, headers={**page, **key}, stream=True, timeout=30
        ) as resp:
            assert resp.status_code == status, resp.text
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-Id"
    assert "Access-Control-Allow-Origin" not in requests.get(server.url + "/health").headers
