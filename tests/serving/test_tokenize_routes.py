"""vLLM's `POST /tokenize` and `POST /detokenize` on a tiny-random server: the ids the
generation routes use for the same prompt or chat, vLLM's shapes, and a 4xx in OpenAI's
error shape naming the field for a bad body (they were a 404: no such route)."""

from __future__ import annotations

import pytest

from tests.helpers import http_json
from tests.serving.route_helpers import completions

CHAT = [{"role": "user", "content": "Name three colours."}]


def tokenize(server, body: dict) -> dict:
    status, out = http_json("POST", server.url + "/tokenize", body)
    assert status == 200, out
    return out


def test_tokenize_gives_the_prompt_ids_completions_uses_in_vllms_shape(tiny_server):
    out = tokenize(tiny_server, {"prompt": "The capital of France is"})
    max_model_len = http_json("GET", tiny_server.url + "/v1/models")[1]["data"][0]["max_model_len"]
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == max_model_len
    assert out["token_strs"] is None
    used = completions(tiny_server, {"prompt": out["tokens"], "max_tokens": 1, "temperature": 0})
    by_text = completions(
        tiny_server, {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    )
    assert used["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == out["count"]
    assert used["choices"][0]["text"] == by_text["choices"][0]["text"]
    # tiny-random's tokenizer adds no special tokens: the field is taken, the ids the same
    plain = tokenize(
        tiny_server, {"prompt": "The capital of France is", "add_special_tokens": False}
    )
    assert plain["tokens"] == out["tokens"]
    strs = tokenize(tiny_server, {"prompt": "hello world", "return_token_strs": True})
    assert len(strs["token_strs"]) == strs["count"] and all(
        isinstance(s, str) for s in strs["token_strs"]
    )


def test_tokenize_a_chat_gives_the_prompt_ids_chat_completions_uses(tiny_server):
    out = tokenize(tiny_server, {"messages": CHAT})
    status, chat = http_json(
        "POST",
        tiny_server.url + "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 1, "temperature": 0},
    )
    assert status == 200 and chat["usage"]["prompt_tokens"] == out["count"], chat
    closed = tokenize(tiny_server, {"messages": CHAT, "add_generation_prompt": False})
    assert closed["count"] < out["count"] and out["tokens"][: closed["count"]] == closed["tokens"]


def test_detokenize_gives_back_the_text_tokenize_took(tiny_server):
    text = "Hello there, how are you?"
    ids = tokenize(tiny_server, {"prompt": text, "add_special_tokens": False})["tokens"]
    status, out = http_json("POST", tiny_server.url + "/detokenize", {"tokens": ids})
    assert status == 200 and out == {"prompt": text}, out
    status, out = http_json("POST", tiny_server.url + "/detokenize", {"tokens": []})
    assert status == 200 and out == {"prompt": ""}, out


@pytest.mark.parametrize(
    ("route", "body", "param", "needle"),
    [
        ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a string"),
        ("/tokenize", {}, None, "give exactly one of prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, None, "give exactly one of prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", "boolean"),
        ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs", "boolean"),
        ("/tokenize", {"messages": []}, "messages", "messages must be a non-empty list"),
        ("/tokenize", {"messages": CHAT, "chat_template": "{{ 'x' }}"}, "chat_template", "not supported"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message", "Cannot set both"),
        ("/tokenize", [], None, "JSON object"),
        ("/detokenize", {"tokens": "abc"}, "tokens", "list of integers"),
        ("/detokenize", {}, "tokens", "list of integers"),
        ("/detokenize", {"tokens": [1, 2.5]}, "tokens", "list of integers"),
        ("/detokenize", {"tokens": [True]}, "tokens", "list of integers"),
        ("/detokenize", {"tokens": [3, -1]}, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": [10**9]}, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": [2**70]}, "tokens", "outside the vocabulary"),
    ],
)  # fmt: skip
def test_a_bad_tokenize_body_is_a_400_in_openais_shape(tiny_server, route, body, param, needle):
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400, out
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400, out
    assert error["param"] == param and needle in error["message"], out
