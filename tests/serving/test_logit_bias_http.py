"""logit_bias on a tiny-random server's routes: /v1/completions, /v1/chat/completions and
/generate's sampling_params take OpenAI's map (string or int token ids), the answer obeys
it, and a bad key, bias or size is a 400 naming the field."""

from __future__ import annotations

import pytest

from tests.helpers import http_json
from tests.serving.route_helpers import GREEDY, completions

FORCED_ID = 308  # "ello": readable, so the chat text shows it
PROMPT = [10 + (i * 13) % 450 for i in range(20)]
CHAT = [{"role": "user", "content": "Name three colours."}]
VOCAB_SIZE = 506  # tiny-random's


def generate(server, sampling: dict) -> dict:
    body = {"input_ids": PROMPT, "sampling_params": {**GREEDY, **sampling}}
    status, out = http_json("POST", f"{server.url}/generate", body)
    assert status == 200, out
    return out


def test_generate_forces_and_bans_tokens(tiny_server):
    plain = generate(tiny_server, {})["output_ids"]
    assert FORCED_ID not in plain
    forced = generate(tiny_server, {"logit_bias": {str(FORCED_ID): 100}})["output_ids"]
    assert forced == [FORCED_ID] * GREEDY["max_new_tokens"]
    banned = generate(tiny_server, {"logit_bias": {str(plain[0]): -100}})["output_ids"]
    assert banned != plain and plain[0] not in banned


def test_completions_obey_the_bias_greedy_and_seeded(tiny_server):
    text = generate(tiny_server, {"logit_bias": {str(FORCED_ID): 100}})["text"]
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        plain = completions(tiny_server, {**body, **sampling})["choices"][0]["text"]
        biased = {**body, **sampling, "logit_bias": {str(FORCED_ID): 100}}
        assert completions(tiny_server, biased)["choices"][0]["text"] == text != plain


def test_chat_obeys_the_bias_and_keeps_raw_logprobs(tiny_server):
    body = {"messages": CHAT, "max_tokens": 4, "logprobs": True, "temperature": 0}
    body["logit_bias"] = {str(FORCED_ID): 100}
    status, out = http_json("POST", f"{tiny_server.url}/v1/chat/completions", body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == "ello" * 4
    # logprobs of the raw logits: the forced token is not the model's own choice
    assert all(t["logprob"] < -1 for t in out["choices"][0]["logprobs"]["content"])


BAD = [
    ({"x": 1}, "key 'x' must be a token id"),
    ({"--5": 1}, "key '--5' must be a token id"),
    ({"-1": 1}, "token id -1 is outside the vocabulary [0, 506)"),
    ({str(VOCAB_SIZE): 1}, f"token id {VOCAB_SIZE} is outside the vocabulary [0, 506)"),
    ({"5": 100.5}, "bias 100.5 for token 5 must be in [-100, 100]"),
    ({"5": -101}, "bias -101.0 for token 5 must be in [-100, 100]"),
    ({"5": "big"}, "bias for token '5' must be a number, got 'big'"),
    ({"5": True}, "bias for token '5' must be a number, got True"),
    ({"5": 1, "05": 2}, "token id 5 appears twice"),
    ([5], "must be an object, got list"),
    ({str(t): 1 for t in range(1025)}, "has 1025 entries; at most 1024 are allowed"),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("bias", "problem"), BAD, ids=[p for _, p in BAD])
def test_openai_routes_refuse_a_bad_bias_naming_it(tiny_server, route, bias, problem):
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, "logit_bias": bias}
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400, out
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "logit_bias", out
    assert error["message"].startswith("logit_bias ") and problem in error["message"], out


@pytest.mark.parametrize(("bias", "problem"), BAD, ids=[p for _, p in BAD])
def test_generate_refuses_a_bad_bias_naming_it(tiny_server, bias, problem):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "logit_bias": bias}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 400, out
    assert out["error"]["param"] == "sampling_params.logit_bias", out
    assert problem in out["error"]["message"], out
