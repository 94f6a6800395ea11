"""The CORS rules shared by the servers and the router (pure)."""

from __future__ import annotations

from pdserve.cors import allowed_origin, answer_headers, is_preflight, preflight_headers

PAGE = "http://page.example"


def test_any_origin_or_the_listed_ones_are_allowed_and_nothing_without_an_origin():
    assert allowed_origin(PAGE, ["*"]) == "*"
    assert allowed_origin(PAGE, [PAGE]) == PAGE
    assert allowed_origin("http://other.example", [PAGE]) is None
    assert allowed_origin(PAGE, []) is None
    assert allowed_origin(None, ["*"]) is None


def test_a_listed_origin_is_named_and_the_answer_varies_by_origin():
    assert answer_headers(PAGE, [PAGE]) == {
        "Access-Control-Allow-Origin": PAGE,
        "Access-Control-Expose-Headers": "X-Request-Id",
        "Vary": "Origin",
    }
    assert "Vary" not in answer_headers(PAGE, ["*"])
    assert answer_headers("http://other.example", [PAGE]) == {}


def test_a_preflight_allows_the_headers_it_asks_for():
    assert is_preflight("OPTIONS", PAGE, "POST")
    assert not is_preflight("OPTIONS", PAGE, None) and not is_preflight("POST", PAGE, "POST")
    headers = preflight_headers(PAGE, "authorization, content-type", ["*"])
    assert headers is not None
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert preflight_headers("http://other.example", None, [PAGE]) is None
