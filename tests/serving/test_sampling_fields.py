"""The sampling fields of a tiny-random server's routes: seeded samples, penalties and
min_tokens, the features it refuses (400 naming the field), logprob counts, usage, stop
tokens and the field names its errors use."""

from __future__ import annotations

import pytest

from pdserve.serving.request_parse import GENERATE_INERT_VALUES
from tests.helpers import http_json, sse_events
from tests.serving.route_helpers import GREEDY, completions, prompt_len

CHAT = [{"role": "user", "content": "Name three colours."}]


def choices_text(answer: dict) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in answer["choices"]]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_seeded_n_samples_differ_from_each_other_and_repeat(tiny_server, route):
    """As vLLM does: sample i of n is seeded with seed + i, so the n choices are n samples
    (not one sample n times), and the same request gives the same n choices again."""
    body = {"prompt": "a b", "messages": CHAT, "max_tokens": 8, "temperature": 1.0}
    body |= {"seed": 11, "n": 3, "ignore_eos": True}
    first = choices_text(http_json("POST", tiny_server.url + route, body)[1])
    assert len(set(first)) == 3, first
    assert choices_text(http_json("POST", tiny_server.url + route, body)[1]) == first
    single = {**body, "n": 1}
    assert choices_text(http_json("POST", tiny_server.url + route, single)[1]) == first[:1]


REFUSED = [
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("suffix", "end"),
    ("guided_json", {"type": "object"}),
    ("regex", "[a-z]+"),
    ("best_of", 3),
    ("structural_tag", {"type": "structural_tag", "structures": [], "triggers": []}),
    ("prompt_logprobs", 1),
    # vLLM's extras; they were ignored, the answer made without them
    ("allowed_token_ids", [5]),
    ("bad_words", ["n"]),
    ("use_beam_search", True),
    ("length_penalty", 2.0),
    ("truncate_prompt_tokens", 1),
    ("return_tokens_as_token_ids", True),
    ("return_token_ids", True),
    ("logits_processors", ["my.Processor"]),
    ("prompt_embeds", "AAAA"),
]
INERT = {
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "best_of": 1,
    "regex": None,
    "bad_words": [],
    "use_beam_search": False,
    "length_penalty": 1.0,
    "return_tokens_as_token_ids": False,
    "return_token_ids": False,
    "logits_processors": [],
}


@pytest.mark.parametrize(
    ("route", "stream"), [("/v1/completions", False), ("/v1/chat/completions", True)]
)
@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f for f, _ in REFUSED])
def test_a_feature_the_server_lacks_is_refused_with_400_naming_it(
    tiny_server, route, stream, field, value
):
    """Never silently ignored: an answer made without the penalty, schema or tools would
    pass for one made with it. What asks for nothing (0, {}, [], "none", null) is taken."""
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, "stream": stream}
    status, out = http_json("POST", tiny_server.url + route, {**body, field: value})
    assert status == 400, out
    assert out["error"]["param"] == field and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"].startswith(f"{field} is not supported by this server")
    status, out = http_json("POST", tiny_server.url + route, {**body, "stream": False, **INERT})
    assert status == 200, out


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_cache_salt_that_is_not_a_string_is_refused_naming_its_field(tiny_server, route):
    """vLLM's `cache_salt` (a non-empty string if given) and SGLang's `extra_key` (a
    string) on every route; null is absent. (They were refused whatever their value.)"""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    if route != "/generate":
        body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2}
    url = tiny_server.url + route
    for field, value in [("cache_salt", ""), ("cache_salt", 5), ("extra_key", ["a"])]:
        status, out = http_json("POST", url, {**body, field: value})
        assert status == 400 and out["error"]["param"] == field, (field, value, out)
    status, out = http_json("POST", url, {**body, "cache_salt": ""})
    assert out["error"]["message"] == (
        "Parameter 'cache_salt' must be a non-empty string if provided."
    )
    salts = {"cache_salt": "tenant-a", "extra_key": None}
    assert http_json("POST", url, {**body, **salts})[0] == 200


PENALTY_PROMPT = [10 + (i * 13) % 450 for i in range(20)]  # tiny-random repeats after ~17


@pytest.mark.parametrize(
    "fields",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.3},
        {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.1},
    ],
)
def test_openai_penalties_are_applied(tiny_server, fields):
    body = {"prompt": PENALTY_PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    plain = completions(tiny_server, body)["choices"][0]["text"]
    penalized = completions(tiny_server, {**body, **fields})["choices"][0]["text"]
    assert penalized != plain
    chat = {"messages": CHAT, "max_tokens": 4, **fields}
    status, out = http_json("POST", f"{tiny_server.url}/v1/chat/completions", chat)
    assert status == 200, out


def test_a_tiny_repetition_penalty_samples_the_prompts_tokens(tiny_server):
    # Each seen token's logit over 1e-40 overflows float32: the answer was token 0 throughout.
    params = {"max_new_tokens": 8, "temperature": 1.0, "seed": 1, "repetition_penalty": 1e-40}
    body = {"input_ids": [100, 101, 102, 103], "sampling_params": params}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 200, out
    assert set(out["output_ids"]) <= {100, 101, 102, 103}, out


def test_openai_min_tokens_holds_back_a_stop_token_id(tiny_server):
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    generated = {"input_ids": PENALTY_PROMPT, "sampling_params": params}
    ids = http_json("POST", f"{tiny_server.url}/generate", generated)[1]["output_ids"]
    body = {"prompt": PENALTY_PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    body["stop_token_ids"] = [ids[1]]
    assert completions(tiny_server, body)["usage"]["completion_tokens"] == 2
    held = completions(tiny_server, {**body, "min_tokens": 6})
    assert held["usage"]["completion_tokens"] >= 6


def test_openai_min_tokens_holds_back_a_stop_string(tiny_server):
    """vLLM's rule: no stop string ends within the first min_tokens tokens' text (the front
    end matched it on the first token and answered one token, finish_reason stop)."""
    body = {"prompt": "hi", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    first_text = completions(tiny_server, {**body, "max_tokens": 1})["choices"][0]["text"]
    stopped = completions(tiny_server, {**body, "stop": [first_text[-1]]})
    assert stopped["usage"]["completion_tokens"] == 1, stopped
    held = completions(tiny_server, {**body, "stop": [first_text[-1]], "min_tokens": 4})
    assert held["usage"]["completion_tokens"] >= 4, held


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("min_tokens", 5),  # more than max_tokens
        ("n", 0),
        ("n", 129),
    ],
)
def test_openai_penalties_out_of_range_are_400_naming_the_field(tiny_server, route, field, value):
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, field: value}
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400, out
    assert out["error"]["param"] == field and out["error"]["message"].startswith(field), out


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value"), [("seed", "x"), ("stop", 5), ("top_k", "3")])
def test_openai_fields_of_the_wrong_type_are_400_naming_the_field(tiny_server, route, field, value):
    """They were named by a JSON path into SGLang's sampling_params, param null."""
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, field: value}
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400, out
    assert out["error"]["param"] == field and out["error"]["message"].startswith(field), out
    assert "sampling_params" not in out["error"]["message"], out


def test_generate_names_a_mistyped_sampling_param(tiny_server):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "seed": "x"}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 400 and out["error"]["param"] == "sampling_params.seed", out


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("frequency_penalty", 1.5, True),
        ("presence_penalty", -1, True),
        ("repetition_penalty", 1.2, True),
        ("min_new_tokens", 2, True),
        ("frequency_penalty", 2.01, False),
        ("repetition_penalty", -1, False),
        ("min_new_tokens", 3, False),  # more than max_new_tokens
    ],
)
def test_generate_takes_sglang_penalties_and_refuses_them_out_of_range(
    tiny_server, field, value, ok
):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, field: value}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    if ok:
        assert status == 200, out
    else:
        assert status == 400 and out["error"]["param"] == f"sampling_params.{field}", out
        assert field in out["error"]["message"]


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_logprob_counts_are_bounded_and_errors_name_the_openai_field(
    tiny_server, route, fields, param
):
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, **fields}
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400 and out["error"]["param"] == param, out
    assert out["error"]["message"].startswith(param), out


def test_every_error_has_openais_four_fields(tiny_server):
    status, out = http_json("POST", f"{tiny_server.url}/v1/completions", {"prompt": []})
    assert status == 400
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["param"] == "prompt" and out["error"]["code"] == 400


def test_usage_counts_each_prompt_of_a_list_and_streamed_text_offsets_run_on(tiny_server):
    """Two equal prompts are two prompts; a streamed answer's text_offset continues from
    the previous chunk's, as in the whole answer, instead of restarting at 0."""
    body = {"prompt": ["a b", "a b"], "max_tokens": 6, "temperature": 0, "logprobs": 1}
    status, whole = http_json("POST", f"{tiny_server.url}/v1/completions", body)
    assert status == 200, whole
    assert whole["usage"]["prompt_tokens"] == 2 * prompt_len(tiny_server, "a b")
    events = sse_events(
        f"{tiny_server.url}/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-2]["usage"] == whole["usage"]
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for event in events[:-2]:
        for choice in event["choices"]:
            offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    assert offsets == {c["index"]: c["logprobs"]["text_offset"] for c in whole["choices"]}


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_a_length_error_names_the_field_the_client_sent(tiny_server, name):
    body = {"messages": CHAT, name: 10**6}
    status, out = http_json("POST", f"{tiny_server.url}/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == name, out
    assert f"+ {name} (1000000) exceeds the context length" in out["error"]["message"]
    status, out = http_json("POST", f"{tiny_server.url}/v1/chat/completions", {**body, name: "x"})
    assert status == 400 and out["error"]["param"] == name, out
    assert out["error"]["message"] == f"{name} must be an integer, got str"


def test_vllms_include_stop_str_in_output_keeps_the_stop_string(tiny_server):
    body = {"prompt": [9, 10], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = http_json("POST", f"{tiny_server.url}/v1/completions", body)[1]["choices"][0]["text"]
    stop = text[3:5]
    kept = {**body, "stop": [stop], "include_stop_str_in_output": True}
    out = http_json("POST", f"{tiny_server.url}/v1/completions", kept)[1]["choices"][0]
    assert out["text"] == text[: text.find(stop) + len(stop)] and out["finish_reason"] == "stop"


def new_char_at(server, ids: list[int]) -> tuple[int, str]:
    """(k, text of ids[:k]): the first k > 1 whose token ends the text so far with a new
    character after another (tiny-random answers stray UTF-8 bytes too: U+FFFD)."""
    for k in range(2, len(ids) + 1):
        text = http_json("POST", f"{server.url}/detokenize", {"tokens": ids[:k]})[1]["prompt"]
        before = http_json("POST", f"{server.url}/detokenize", {"tokens": ids[: k - 1]})[1]
        last_two = text[-2:]
        if text.startswith(before["prompt"]) and len(last_two) == 2 and "\ufffd" not in last_two:
            if text[-1] not in text[:-1]:
                return k, text
    raise AssertionError(f"no token of {ids} adds a new character")


def stopped_answer(server, max_tokens: int, stop: list[str]) -> tuple[str, str, str | None]:
    body = {"prompt": [9, 10], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    choice = completions(server, {**body, "stop": stop})["choices"][0]
    return choice["text"], choice["finish_reason"], choice["stop_reason"]


def test_a_stop_string_at_the_length_limit_ends_the_answer_as_a_stop(tiny_server):
    """vLLM's rule: an answer cut at a stop string ended with that string, even when the
    token that completed it was the last one allowed (the text was cut, but the answer
    said finish_reason length, stop_reason null)."""
    ids = http_json(
        "POST", f"{tiny_server.url}/generate", {"input_ids": [9, 10], "sampling_params": GREEDY}
    )[1]["output_ids"]
    k, text = new_char_at(tiny_server, ids)
    assert stopped_answer(tiny_server, k, [text[-1]]) == (text[:-1], "stop", text[-1])


def test_of_stop_strings_a_token_completes_together_the_first_listed_cuts_the_text(tiny_server):
    """vLLM's and SGLang's rule, and the engine's: of stop strings ending at once, the first
    listed ends the answer. The text was cut at the one that began first while the answer
    named the first listed (text + stop_reason was not the generated text)."""
    ids = http_json(
        "POST", f"{tiny_server.url}/generate", {"input_ids": [9, 10], "sampling_params": GREEDY}
    )[1]["output_ids"]
    k, text = new_char_at(tiny_server, ids)
    stops = [text[-1], text[-2:]]
    assert stopped_answer(tiny_server, 12, stops) == (text[:-1], "stop", text[-1])


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_a_stop_token_is_counted_but_its_text_left_out_unless_no_stop_trim(tiny_server, route):
    """As SGLang and vLLM answer: the stop token (here a plain, not special, one) ends the
    answer and is one of its tokens, but not part of its text."""
    ids = http_json(
        "POST", f"{tiny_server.url}/generate", {"input_ids": [9, 10], "sampling_params": GREEDY}
    )[1]["output_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])

    def answer(max_tokens: int, **fields) -> tuple[str, str, int]:
        if route == "/generate":
            params = {**GREEDY, "max_new_tokens": max_tokens, **fields}
            out = http_json(
                "POST", tiny_server.url + route, {"input_ids": [9, 10], "sampling_params": params}
            )[1]
            return out["text"], out["meta_info"]["finish_reason"]["type"], len(out["output_ids"])
        body = {"prompt": [9, 10], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        body |= fields
        out = http_json("POST", tiny_server.url + route, body)[1]
        choice = out["choices"][0]
        return choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"]

    before, _, _ = answer(k)
    through, _, _ = answer(k + 1)
    assert answer(12, stop_token_ids=[ids[k]]) == (before, "stop", k + 1)
    assert answer(12, stop_token_ids=[ids[k]], no_stop_trim=True) == (through, "stop", k + 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("regex", "a+"),
        ("n", 2),
    ],
)
def test_sglang_sampling_params_the_server_lacks_are_refused_on_generate(tiny_server, field, value):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, field: value}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 400 and out["error"]["param"] == f"sampling_params.{field}", out
    inert = {
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "min_new_tokens": 0,
        "n": 1,
    }
    body["sampling_params"] = {"max_new_tokens": 2, **inert}
    assert http_json("POST", f"{tiny_server.url}/generate", body)[0] == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_data", "http://example.com/cat.png"),
        ("lora_path", "my-adapter"),
        ("input_embeds", [[0.5]]),
        ("custom_logit_processor", "serialized"),
        ("token_ids_logprob", [1, 2]),
        ("session_params", {"id": "s"}),
    ],
)
def test_generate_refuses_sglang_features_the_server_lacks(tiny_server, field, value):
    """They were silently ignored: an answer without the image or the adapter passed for
    one made with it."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", {**body, field: value})
    assert status == 400 and out["error"]["param"] == field, out
    assert out["error"]["message"].startswith(f"{field} is not supported by this server"), out
    for inert in [None, *GENERATE_INERT_VALUES[field]]:  # e.g. no images: []
        status, out = http_json("POST", f"{tiny_server.url}/generate", {**body, field: inert})
        assert status == 200, (inert, out)
