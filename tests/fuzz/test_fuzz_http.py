"""Property-based fuzzing of every HTTP route on every role (native, OpenAI, admin,
bootstrap, router): garbage is always a 4xx with a message (valid input a 2xx), never a 5xx,
a crash or a hang; afterwards every page is free and a correct request gets its tokens."""

from __future__ import annotations

import socket

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.disagg.pd_driver import wait_idle
from tests.fuzz import strategies as s
from tests.helpers import http_json

pytestmark = pytest.mark.fuzz

TIMEOUT_S = 30.0  # far beyond any answer: reaching it means a stuck request
GENERATION_ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]
READ_ROUTES = [
    "/health", "/health_generate", "/server_info", "/get_server_info", "/model_info",
    "/get_model_info", "/v1/models", "/get_load", "/metrics", "/flush_cache",
    "/debug/kv_cache",
]  # fmt: skip
ROUTER_READ_ROUTES = [
    "/health", "/readiness", "/metrics", "/workers", "/server_info", "/get_server_info",
    "/v1/models", "/model_info",
]  # fmt: skip
PROBE = {
    "input_ids": [11, 12, 13, 14, 15],
    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
}


def body_strategy(route: str, pd_fields: st.SearchStrategy) -> st.SearchStrategy:
    if route == "/generate":
        structured = s.generate_body(pd_fields)
    else:
        structured = s.openai_body(route.endswith("chat/completions"), pd_fields)
    return st.one_of(structured, s.JSON, s.RAW_BODIES)


def send(method: str, url: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else requests.models.complexjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    return requests.request(method, url, data=data, headers=headers, timeout=TIMEOUT_S)


def check(resp: requests.Response, allowed: set[int] | range) -> None:
    """No 5xx; an allowed status; a 4xx carries a message."""
    where = f"{resp.request.method} {resp.url} -> {resp.status_code}: {resp.text[:300]}"
    assert resp.status_code < 500, where
    assert resp.status_code in allowed, where
    if resp.status_code >= 400:
        assert resp.text.strip(), where


# -- generation routes ----------------------------------------------------------------
@pytest.mark.parametrize("route", GENERATION_ROUTES)
@given(data=st.data())
def test_colocated_generation_routes_answer_2xx_or_4xx(servers, route, data):
    body = data.draw(body_strategy(route, s.PD_GARBAGE))
    check(send("POST", servers.colocated.url + route, body), {200} | set(range(400, 500)))


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("route", GENERATION_ROUTES)
@given(data=st.data())
def test_lone_pd_legs_without_a_valid_room_answer_4xx(servers, role, route, data):
    url = servers.prefill.url if role == "prefill" else servers.decode.url
    body = data.draw(body_strategy(route, s.PD_GARBAGE))
    check(send("POST", url + route, body), range(400, 500))


@pytest.mark.parametrize("route", GENERATION_ROUTES)
@given(data=st.data())
def test_router_generation_routes_answer_2xx_or_4xx(servers, route, data):
    body = data.draw(body_strategy(route, s.NO_FIELDS))
    check(send("POST", servers.router.url + route, body), {200} | set(range(400, 500)))


@given(
    role=st.sampled_from(["colocated", "prefill", "decode", "router"]),
    route=st.sampled_from(["/tokenize", "/detokenize"]),
    body=st.one_of(s.tokenize_body(), s.JSON, s.RAW_BODIES),
)
def test_tokenize_routes_answer_2xx_or_4xx_on_every_role(servers, role, route, body):
    url = getattr(servers, role).url
    check(send("POST", url + route, body), {200} | set(range(400, 500)))


# -- admin, bootstrap and router management routes ------------------------------------
@given(
    role=st.sampled_from(["colocated", "prefill", "decode"]),
    route=st.sampled_from(READ_ROUTES),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    query=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
)
def test_admin_routes_answer_2xx_or_405(servers, role, route, method, query):
    url = {"colocated": servers.colocated.url, "prefill": servers.prefill.url}.get(
        role, servers.decode.url
    )
    resp = requests.request(method, url + route, params=query, timeout=TIMEOUT_S)
    check(resp, {200, 405} if route != "/flush_cache" else {200})


@given(role=st.sampled_from(["colocated", "decode"]), body=st.one_of(s.JSON, s.RAW_BODIES,
       st.fixed_dictionaries({}, optional={"rid": s.field(st.text(max_size=6)),
                                           "abort_all": s.field(st.booleans())})))  # fmt: skip
def test_abort_request_answers_200_or_400(servers, role, body):
    url = servers.colocated.url if role == "colocated" else servers.decode.url
    check(send("POST", url + "/abort_request", body), {200, 400})


@given(path=st.text(min_size=1, max_size=12).map(lambda t: "/" + t.lstrip("/")))
def test_unknown_paths_answer_4xx(servers, path):
    for url in (servers.colocated.url, servers.router.url):
        if path.rstrip("/") in READ_ROUTES + ROUTER_READ_ROUTES + GENERATION_ROUTES:
            continue
        check(requests.get(url + requests.utils.quote(path), timeout=TIMEOUT_S), range(400, 500))


BOOTSTRAP_BODIES = {
    ("PUT", "/route"): st.one_of(s.JSON, s.RAW_BODIES),
    ("POST", "/register_dp_rank"): st.fixed_dictionaries(
        {"bootstrap_room": st.one_of(st.integers(2**40, 2**62), s.BAD_ROOMS)},
        optional={
            "dp_rank": s.field(s.SMALL_INTS),
            "error": s.field(st.text(max_size=8)),
            "status": s.field(st.integers(-1, 700)),
        },
    ),  # fmt: skip
    ("POST", "/query_dp_ranks"): st.one_of(
        st.fixed_dictionaries(
            {
                "bootstrap_rooms": st.lists(
                    st.one_of(st.integers(0, 2**62), s.BAD_ROOMS), max_size=70
                )
            }
        ),
        s.JSON,
        s.RAW_BODIES,
    ),  # fmt: skip
}


@pytest.mark.parametrize("method,path", list(BOOTSTRAP_BODIES), ids=lambda v: str(v))
@given(data=st.data())
def test_bootstrap_routes_answer_2xx_or_4xx(servers, method, path, data):
    body = data.draw(st.one_of(BOOTSTRAP_BODIES[(method, path)], s.JSON, s.RAW_BODIES))
    url = f"http://127.0.0.1:{servers.prefill.bootstrap_port}{path}"
    check(send(method, url, body), {200} | set(range(400, 500)))


@given(rank=st.one_of(st.text(max_size=12), st.integers(-5, 2**70).map(str)))
def test_bootstrap_get_route_answers_2xx_or_4xx(servers, rank):
    url = f"http://127.0.0.1:{servers.prefill.bootstrap_port}/route"
    check(requests.get(url, params={"prefill_dp_rank": rank}, timeout=TIMEOUT_S), {200, 400, 404})


@given(
    route=st.sampled_from(ROUTER_READ_ROUTES),
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    body=st.one_of(s.JSON, s.RAW_BODIES),
)
def test_router_management_routes_answer_2xx_or_4xx(servers, route, method, body):
    check(send(method, servers.router.url + route, body), {200} | set(range(400, 500)))


# -- raw bytes on the HTTP ports ------------------------------------------------------
RAW_REQUESTS = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda method, path, headers, body: method + b" " + path + b" HTTP/1.1\r\n" + headers + b"\r\n" + body,
        st.sampled_from([b"GET", b"POST", b"PUT", b"\x00", b"G\xffT", b""]),
        st.sampled_from([b"/generate", b"/health", b"*", b"", b"/" + b"a" * 9000]),
        st.lists(st.sampled_from([b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
                                  b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n",
                                  b"Host: x\r\n", b"X: \x00\xff\r\n", b"bad header\r\n", b": v\r\n"]),
                 max_size=4).map(b"".join),
        st.sampled_from([b"", b"{}", b"zz\r\n", b"5\r\nhello\r\n0\r\n\r\n", b'{"input_ids": [1]}']),
    ),
)  # fmt: skip


@given(target=st.sampled_from(["colocated", "router", "bootstrap"]), raw=RAW_REQUESTS)
def test_raw_bytes_get_a_4xx_or_a_closed_connection(servers, target, raw):
    port = {
        "colocated": int(servers.colocated.url.rsplit(":", 1)[1]),
        "router": int(servers.router.url.rsplit(":", 1)[1]),
        "bootstrap": servers.prefill.bootstrap_port,
    }[target]
    answer = exchange(port, raw)
    if answer.startswith(b"HTTP/"):
        status = int(answer.split(b" ", 2)[1])
        assert status < 500 or (status == 503 and raw.startswith(b"GET /health")), answer[:300]


def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, end the writing side, and read until the server closes (within TIMEOUT_S)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


# -- afterwards -----------------------------------------------------------------------
def test_every_server_still_serves_correct_tokens_and_holds_no_pages(servers):
    for url in (servers.colocated.url, servers.prefill.url, servers.decode.url, servers.router.url):
        assert requests.get(url + "/health", timeout=10).status_code == 200, url
    wait_idle([servers.colocated.url, servers.prefill.url, servers.decode.url], timeout_s=20)
    status, reference = http_json("POST", servers.colocated.url + "/generate", PROBE)
    assert status == 200, reference
    status, routed = http_json("POST", servers.router.url + "/generate", PROBE)
    assert status == 200, routed
    assert routed["output_ids"] == reference["output_ids"]
    wait_idle([servers.colocated.url, servers.prefill.url, servers.decode.url], timeout_s=20)
