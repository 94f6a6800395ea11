"""Every route of a colocated tiny-random server, over real HTTP on loopback."""

from __future__ import annotations

import openai
import pytest

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.serving.tokenizer_loader import load_tokenizer
from tests.helpers import http_json, sse_events

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def test_generate_single_answers_text_ids_and_meta_info(tiny_server):
    status, out = http_json(
        "POST", f"{tiny_server.url}/generate", {"text": "Hello", "sampling_params": GREEDY}
    )
    assert status == 200, out
    assert isinstance(out["text"], str) and len(out["output_ids"]) == 6
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "matched": None}
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0
    assert "output_token_logprobs" not in meta


def test_generate_batch_returns_one_answer_per_prompt_in_order(tiny_server):
    single = [
        http_json(
            "POST", f"{tiny_server.url}/generate", {"input_ids": ids, "sampling_params": GREEDY}
        )[1]
        for ids in ([1, 2, 3], [4, 5])
    ]
    status, batch = http_json(
        "POST",
        f"{tiny_server.url}/generate",
        {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": GREEDY, "rid": ["b0", "b1"]},
    )
    assert status == 200 and isinstance(batch, list) and len(batch) == 2
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in single]
    assert [b["meta_info"]["id"] for b in batch] == ["b0", "b1"]


def test_generate_stream_sends_growing_text_and_ends_with_done(tiny_server):
    events = sse_events(
        f"{tiny_server.url}/generate", {"text": "Hello", "sampling_params": GREEDY, "stream": True}
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2
    ids = [c["output_ids"] for c in chunks]
    assert all(a == b[: len(a)] for a, b in zip(ids, ids[1:], strict=False))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    _, whole = http_json(
        "POST", f"{tiny_server.url}/generate", {"text": "Hello", "sampling_params": GREEDY}
    )
    assert chunks[-1]["output_ids"] == whole["output_ids"] and chunks[-1]["text"] == whole["text"]


def test_generate_logprobs_in_sglang_format(tiny_server):
    status, out = http_json(
        "POST",
        f"{tiny_server.url}/generate",
        {
            "input_ids": [5, 6, 7, 8],
            "sampling_params": GREEDY,
            "return_logprob": True,
            "logprob_start_len": 1,
            "top_logprobs_num": 2,
        },
    )
    assert status == 200, out
    meta = out["meta_info"]
    out_lp = meta["output_token_logprobs"]
    assert [t for _, t, _ in out_lp] == out["output_ids"]
    assert all(lp <= 0 and text is None for lp, _, text in out_lp)
    assert [t for _, t, _ in meta["input_token_logprobs"]] == [6, 7, 8]
    assert all(len(row) == 2 for row in meta["output_top_logprobs"])
    # Greedy: the chosen token is the most likely one.
    for (lp, tid, _), top in zip(out_lp, meta["output_top_logprobs"], strict=True):
        assert top[0][1] == tid and top[0][0] == pytest.approx(lp, abs=1e-4)


def test_stop_string_trims_text_and_reports_the_match(tiny_server):
    _, free = http_json(
        "POST",
        f"{tiny_server.url}/generate",
        {"input_ids": [9, 10], "sampling_params": {**GREEDY, "max_new_tokens": 12}},
    )
    text = free["text"]
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    _, out = http_json(
        "POST",
        f"{tiny_server.url}/generate",
        {"input_ids": [9, 10], "sampling_params": {**GREEDY, "max_new_tokens": 12, "stop": [stop]}},
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]
    _, kept = http_json(
        "POST",
        f"{tiny_server.url}/generate",
        {
            "input_ids": [9, 10],
            "sampling_params": {
                **GREEDY,
                "max_new_tokens": 12,
                "stop": [stop],
                "no_stop_trim": True,
            },
        },
    )
    assert kept["text"] == text[: text.find(stop) + len(stop)]


def test_completions_and_chat_completions(tiny_server):
    status, out = http_json(
        "POST",
        f"{tiny_server.url}/v1/completions",
        {
            "model": None,
            "prompt": ["a", "b"],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": 1,
            "log_metrics": True,
            "return_bytes": False,
        },
    )
    assert status == 200, out
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    assert out["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["tokens"]) for c in out["choices"]
    )
    status, out = http_json(
        "POST",
        f"{tiny_server.url}/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 5,
            "n": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "separate_reasoning": True,
            "stream_reasoning": True,
        },
    )
    assert status == 200, out
    assert out["object"] == "chat.completion" and [c["index"] for c in out["choices"]] == [0, 1, 2]
    for choice in out["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])
    assert (
        out["usage"]["total_tokens"]
        == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    )


def test_chat_stream_deltas_add_up_to_the_whole_answer(tiny_server):
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(f"{tiny_server.url}/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for ev in events[:-1]:
        for choice in ev["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            assert choice["logprobs"] is None
    assert events[-2]["usage"]["completion_tokens"] > 0
    _, whole = http_json("POST", f"{tiny_server.url}/v1/chat/completions", body)
    assert texts[0] == whole["choices"][0]["message"]["content"] == texts[1]


def test_chat_stream_with_logprobs_gives_one_entry_per_token(tiny_server):
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
        "stream": True,
    }
    events = sse_events(f"{tiny_server.url}/v1/chat/completions", body)
    entries = [e for ev in events[:-1] for c in ev["choices"] for e in c["logprobs"]["content"]]
    assert len(entries) == 5 and all(len(e["top_logprobs"]) == 1 for e in entries)


def test_openai_client_chat_streaming_chat_and_completions(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chat.choices[0].message.content
    comp = client.completions.create(model="tiny-random", prompt="abc", max_tokens=3, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_gets_vllms_404_and_no_model_is_served(tiny_server, route, stream):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, out = http_json(
        "POST", tiny_server.url + route, {**body, "model": "gpt-4o", "stream": stream}
    )
    assert status == 404, out
    assert out == {
        "error": {
            "message": "The model `gpt-4o` does not exist.",
            "type": "NotFoundError",
            "code": 404,
            "param": "model",
        }
    }
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 200 and out["model"] == "tiny-random", out


def test_info_routes_have_the_types_the_sglang_router_checks(tiny_server):
    status, info = http_json("GET", f"{tiny_server.url}/server_info")
    assert status == 200
    for key, kind in [
        ("model_path", str),
        ("served_model_name", str),
        ("tp_size", int),
        ("dp_size", int),
        ("disaggregation_mode", str),
        ("version", str),
        ("page_size", int),
        ("load_balance_method", str),
    ]:
        assert isinstance(info[key], kind), key
    assert info["disaggregation_mode"] == "null" and info["dp_size"] == 1
    assert http_json("GET", f"{tiny_server.url}/get_server_info")[1]["dp_size"] == 1
    status, model = http_json("GET", f"{tiny_server.url}/model_info")
    assert status == 200 and model["is_generation"] is True
    assert model["model_type"] == "llama" and isinstance(model["architectures"], list)
    status, models = http_json("GET", f"{tiny_server.url}/v1/models")
    assert models["data"][0]["id"] == "tiny-random"


def test_get_load_health_and_flush_cache(tiny_server):
    status, load = http_json("GET", f"{tiny_server.url}/get_load")
    assert status == 200 and len(load) == 1
    assert {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
    assert http_json("GET", f"{tiny_server.url}/health")[0] == 200
    assert http_json("GET", f"{tiny_server.url}/health_generate")[0] == 200
    assert http_json("POST", f"{tiny_server.url}/flush_cache")[0] == 200


def test_metrics_count_requests_tokens_and_pages(tiny_server):
    http_json(
        "POST", f"{tiny_server.url}/generate", {"text": "count me", "sampling_params": GREEDY}
    )
    status, text = http_json("GET", f"{tiny_server.url}/metrics")
    assert status == 200
    for name in (
        'pdserve_requests_total{status="length"}',
        "pdserve_prompt_tokens_total",
        "pdserve_generation_tokens_total",
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
        'pdserve_num_running_reqs{dp_rank="0"}',
        'pdserve_kv_pages_free{dp_rank="0"}',
        'pdserve_kv_pages_used{dp_rank="0"}',
    ):
        assert name in text, name
    generated = [
        line for line in text.splitlines() if line.startswith("pdserve_generation_tokens_total ")
    ]
    assert float(generated[0].split()[1]) >= 6


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
    ("logit_bias", {"5": 100}),
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("suffix", "end"),
    ("guided_json", {"type": "object"}),
    ("regex", "[a-z]+"),
    ("best_of", 3),
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


def test_openai_min_tokens_holds_back_a_stop_token_id(tiny_server):
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    generated = {"input_ids": PENALTY_PROMPT, "sampling_params": params}
    ids = http_json("POST", f"{tiny_server.url}/generate", generated)[1]["output_ids"]
    body = {"prompt": PENALTY_PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    body["stop_token_ids"] = [ids[1]]
    assert completions(tiny_server, body)["usage"]["completion_tokens"] == 2
    held = completions(tiny_server, {**body, "min_tokens": 6})
    assert held["usage"]["completion_tokens"] >= 6


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("min_tokens", 5),  # more than max_tokens
    ],
)
def test_openai_penalties_out_of_range_are_400_naming_the_field(tiny_server, route, field, value):
    body = {"prompt": "hi", "messages": CHAT, "max_tokens": 2, field: value}
    status, out = http_json("POST", tiny_server.url + route, body)
    assert status == 400, out
    assert out["error"]["param"] == field and out["error"]["message"].startswith(field), out


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
    assert out["error"]["param"] is None and out["error"]["code"] == 400


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


def prompt_len(server, text: str) -> int:
    body = {"text": text, "sampling_params": {"max_new_tokens": 0}}
    return http_json("POST", f"{server.url}/generate", body)[1]["meta_info"]["prompt_tokens"]


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


@pytest.mark.parametrize("k", [0, 1])
def test_completion_top_logprobs_hold_the_sampled_token_as_openais_do(tiny_server, k):
    body = {"prompt": "a b", "max_tokens": 8, "seed": 3, "logprobs": k, "ignore_eos": True}
    status, out = http_json("POST", f"{tiny_server.url}/v1/completions", body)
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 8
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert token in top and len(top) <= k + 1


def completions(server, body: dict) -> dict:
    status, out = http_json("POST", f"{server.url}/v1/completions", body)
    assert status == 200, out
    return out


def assert_offsets_follow_tokens(lp: dict) -> None:
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


@pytest.mark.parametrize("prompt", ["one two three four", [5, 9, 17, 33, 2, 71]])
def test_echo_gives_the_prompt_logprobs_lm_eval_reads(tiny_server, prompt):
    """lm-evaluation-harness's loglikelihood request: the prompt's text, tokens and logprobs
    (the first null), equal to /generate's prompt logprobs; the prompt token in each top map."""
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}
    choice = completions(tiny_server, body)["choices"][0]
    key = "text" if isinstance(prompt, str) else "input_ids"
    native = {key: prompt, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    status, want = http_json("POST", f"{tiny_server.url}/generate", native)
    assert status == 200, want
    ids = [tid for _, tid, _ in want["meta_info"]["input_token_logprobs"]]
    want_lps = [lp for lp, _, _ in want["meta_info"]["input_token_logprobs"]]
    tokenizer = load_tokenizer(resolve_model_dir("tiny-random"))
    assert choice["text"] == (prompt if isinstance(prompt, str) else tokenizer.decode(ids))
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([tid]) for tid in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want_lps[1:], abs=1e-5)
    rows = zip(lp["tokens"][1:], want_lps[1:], lp["top_logprobs"][1:], strict=True)
    for token, token_lp, top in rows:
        assert top[token] == pytest.approx(token_lp, abs=1e-5) and 2 <= len(top) <= 3
    assert_offsets_follow_tokens(lp)


def test_echo_puts_the_prompt_in_front_of_each_choice(tiny_server):
    """A list of prompts, n samples each, with and without logprobs: each choice is its
    prompt's echo followed by the answer it gets without echo; tokens and offsets run on."""
    body = {"prompt": ["a b", "hello there"], "n": 2, "max_tokens": 4, "temperature": 0}
    plain = completions(tiny_server, {**body, "logprobs": 1})["choices"]
    for logprobs in (None, 1):
        echoed = completions(tiny_server, {**body, "echo": True, "logprobs": logprobs})["choices"]
        assert [c["index"] for c in echoed] == [0, 1, 2, 3]
        prompts = ["a b", "a b", "hello there", "hello there"]
        for choice, want, prompt in zip(echoed, plain, prompts, strict=True):
            assert choice["text"] == prompt + want["text"]
            assert choice["finish_reason"] == want["finish_reason"]
            if logprobs is None:
                assert choice["logprobs"] is None
                continue
            lp, want_lp = choice["logprobs"], want["logprobs"]
            num_prompt = len(lp["tokens"]) - len(want_lp["tokens"])
            assert num_prompt == prompt_len(tiny_server, prompt)
            assert lp["tokens"][num_prompt:] == want_lp["tokens"]
            assert lp["token_logprobs"][num_prompt:] == pytest.approx(
                want_lp["token_logprobs"], abs=1e-4
            )
            assert lp["token_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
            assert_offsets_follow_tokens(lp)


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_a_streamed_echo_sends_the_prompt_in_each_choices_first_chunk(tiny_server, max_tokens):
    """As vLLM: the prompt's text (and logprobs) come in front of a choice's first delta;
    the chunks add up to the whole answer."""
    body = {"prompt": ["x y z", "a"], "n": 2, "echo": True, "logprobs": 1, "temperature": 0}
    body["max_tokens"] = max_tokens
    whole = completions(tiny_server, body)["choices"]
    events = sse_events(f"{tiny_server.url}/v1/completions", {**body, "stream": True})
    text: dict[int, str] = {}
    lps: dict[int, dict[str, list]] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            i = choice["index"]
            if i not in text:
                assert choice["text"].startswith(["x y z", "a"][i // 2]), choice
            text[i] = text.get(i, "") + choice["text"]
            for key, values in choice["logprobs"].items():
                lps.setdefault(i, {}).setdefault(key, []).extend(values)
    assert text == {c["index"]: c["text"] for c in whole}
    for choice in whole:
        got = lps[choice["index"]]
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert got["text_offset"] == choice["logprobs"]["text_offset"]
        assert got["token_logprobs"][1:] == pytest.approx(
            choice["logprobs"]["token_logprobs"][1:], abs=1e-4
        )
