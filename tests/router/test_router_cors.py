"""The router answers browser pages of allowed origins (CORS), as SGLang's router does."""

from __future__ import annotations

import requests

from tests.helpers import launch_server, wait_until
from tests.router.conftest import router_args

KEY = "sk-router-cors"
PAGE = "http://page.example"


def preflight(url: str, origin: str) -> requests.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    return requests.options(url + "/v1/chat/completions", headers=headers, timeout=10)


def test_a_page_of_an_allowed_origin_may_call_the_router_without_a_key_for_its_preflight(stubs):
    """The preflight was a 401 (browsers send no key with it), and no answer named the
    page's origin: the browser hid every answer from the page."""
    args = router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url])
    args += ["--health-check-interval-s", "0.2", "--api-key", KEY, "--allowed-origins", PAGE]
    with launch_server(args, subcommand="router") as router:  # ready: /health, no key
        key = {"Authorization": f"Bearer {KEY}"}
        ready = lambda: requests.get(router.url + "/readiness", headers=key).ok  # noqa: E731
        wait_until(ready, 30, "the router's readiness")
        check_cors(router.url)


def check_cors(url: str) -> None:
    allowed = preflight(url, PAGE)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["Access-Control-Allow-Origin"] == PAGE
    assert allowed.headers["Vary"] == "Origin"
    assert allowed.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    other = preflight(url, "http://other.example")  # not allowed: the key is asked
    assert other.status_code == 401 and "Access-Control-Allow-Origin" not in other.headers
    headers = {"Origin": PAGE, "Authorization": f"Bearer {KEY}"}
    for stream in (False, True):
        body = {"text": "x", "stream": stream}
        with requests.post(
            url + "/generate", json=body, headers=headers, stream=stream, timeout=10
        ) as resp:
            assert resp.status_code == 200, resp.text
            assert resp.headers["Access-Control-Allow-Origin"] == PAGE
            assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-Id"
            assert resp.headers["X-Request-Id"]
    refused = requests.post(url + "/generate", json={"text": []}, headers=headers)
    assert refused.status_code == 400 and refused.headers["Access-Control-Allow-Origin"] == PAGE
    no_key = requests.post(url + "/generate", json={"text": "x"}, headers={"Origin": PAGE})
    assert no_key.status_code == 401 and no_key.headers["Access-Control-Allow-Origin"] == PAGE


def test_no_origin_given_means_no_cors(stubs, router_factory):
    router = router_factory(
        [*router_args([(stubs["p1"].url, 8998)], [stubs["d1"].url]), "--allowed-origins"]
    )
    refused = preflight(router.url, PAGE)
    assert refused.status_code == 405 and "Access-Control-Allow-Origin" not in refused.headers
