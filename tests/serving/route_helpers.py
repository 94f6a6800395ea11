"""Small request helpers the route tests of a tiny-random server share."""

from __future__ import annotations

from tests.helpers import http_json

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def completions(server, body: dict) -> dict:
    """A /v1/completions answer that must be a 200."""
    status, out = http_json("POST", f"{server.url}/v1/completions", body)
    assert status == 200, out
    return out


def prompt_len(server, text: str) -> int:
    """How many tokens the server makes of `text`."""
    body = {"text": text, "sampling_params": {"max_new_tokens": 0}}
    return http_json("POST", f"{server.url}/generate", body)[1]["meta_info"]["prompt_tokens"]
