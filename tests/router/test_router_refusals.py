"""The router's own refusals, as a real process in front of stub workers: what a client
without the API key gets, and a body in a coding nobody reads."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import raw_exchange
from tests.router.conftest import router_args

pytestmark = pytest.mark.timeout(120)
KEY = "router-key-2"


def test_a_401_names_the_bearer_scheme_it_wants(stubs, server_factory):
    """RFC 9110 11.6.1: a 401 carries WWW-Authenticate; the servers' did, the router's not."""
    args = router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url])
    router = server_factory([*args, "--api-key", KEY], subcommand="router")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("POST", "/generate"), ("GET", "/workers"), ("GET", "/metrics")):
            resp = requests.request(method, router.url + path, headers=headers, timeout=10)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.headers["WWW-Authenticate"] == "Bearer", resp.headers
            assert resp.json()["error"]["type"] == "authentication_error"
    ok = requests.get(router.url + "/workers", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and "WWW-Authenticate" not in ok.headers


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["plain", "expect"])
def test_a_request_without_the_key_is_refused_from_its_head(stubs, server_factory, expect):
    """The 401 came only once the whole body was in: a client without the key could make
    the router read and hold up to 512 MiB per connection (and was sent 100 Continue). Now
    it comes on the head alone, with the usual body and challenge, and the connection
    closes (the body is never read)."""
    args = router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url])
    router = server_factory([*args, "--api-key", KEY], subcommand="router")
    for auth in (b"", b"Authorization: Bearer wrong\r\n"):
        head = (
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000000\r\n" + expect + auth + b"\r\n"
        )
        answer = raw_exchange(router.url, head + b'{"text": "', timeout_s=20)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 401 Unauthorized", answer[:300]
        assert b"100 Continue" not in answer and b"WWW-Authenticate: Bearer\r\n" in rest
        assert b'"type":"authentication_error"' in rest, rest
    assert stubs["p1"].log()["bodies"] == [] and stubs["d1"].log()["bodies"] == []


def test_a_body_coded_br_is_a_415_without_a_leg(stubs, router_factory):
    """Like the servers: a JSON 415 naming the codings accepted, and no worker is asked."""
    router = router_factory(router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url]))
    for coding in ("br", "zstd", "BR"):
        resp = requests.post(
            router.url + "/v1/completions",
            data=b'{"prompt": "x"}',
            headers={"Content-Encoding": coding},
            timeout=10,
        )
        assert resp.status_code == 415, resp.text
        assert resp.headers["Accept-Encoding"] == "gzip, deflate, identity"
        error = resp.json()["error"]
        assert error["code"] == 415 and "gzip, deflate or identity" in error["message"]
    assert stubs["p1"].log()["bodies"] == [] and stubs["d1"].log()["bodies"] == []
