"""Every route of a colocated tiny-random server, over real HTTP on loopback."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import http_json, sse_events
from tests.serving.route_helpers import GREEDY, prompt_len


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


def test_streams_of_several_items_show_each_state_once_and_finish_last(tiny_server):
    """Each chunk shows its item as it was after that chunk's tokens: a finish_reason only on
    the item's last chunk, ids growing by what each chunk added (a batch /generate stream and
    an OpenAI stream with n > 1, whose items' outputs arrive queued together)."""
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9], [10, 11], [12], [13, 14, 15]]
    body = {
        "input_ids": prompts,
        "sampling_params": {**GREEDY, "max_new_tokens": 24},
        "stream": True,
    }
    chunks = sse_events(f"{tiny_server.url}/generate", body)[:-1]
    for index in range(len(prompts)):
        mine = [c for c in chunks if c["index"] == index]
        ids = [c["output_ids"] for c in mine]
        assert all(len(a) < len(b) and a == b[: len(a)] for a, b in zip(ids, ids[1:], strict=False))
        assert [c["meta_info"]["finish_reason"] is None for c in mine] == [True] * (
            len(mine) - 1
        ) + [False]
        assert len(ids[-1]) == 24
    body = {
        "prompt": "Hello",
        "max_tokens": 24,
        "temperature": 1.0,
        "n": 8,
        "stream": True,
        "ignore_eos": True,
    }
    chunks = sse_events(f"{tiny_server.url}/v1/completions", body)[:-1]
    for index in range(8):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]


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


@pytest.mark.parametrize("stream", [False, True])
def test_generate_logprobs_carry_each_tokens_text_with_return_text_in_logprobs(tiny_server, stream):
    """SGLang's `return_text_in_logprobs`: the third entry of each [logprob, id, text] is the
    token's own text, prompt, answer and alternatives alike (it was ignored: always null)."""
    body = {
        "input_ids": [5, 6, 7, 8],
        "sampling_params": GREEDY,
        "return_logprob": True,
        "logprob_start_len": 1,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
        "stream": stream,
    }
    if stream:
        out = sse_events(f"{tiny_server.url}/generate", body)[-2]
    else:
        status, out = http_json("POST", f"{tiny_server.url}/generate", body)
        assert status == 200, out
    meta = out["meta_info"]
    rows = [*meta["input_token_logprobs"], *meta["output_token_logprobs"]]
    rows += [
        row for tops in meta["input_top_logprobs"] + meta["output_top_logprobs"] for row in tops
    ]
    assert len(rows) == 3 + 6 + 2 * (3 + 6)
    ids = sorted({tid for _, tid, _ in rows})
    texts = {
        tid: http_json("POST", f"{tiny_server.url}/detokenize", {"tokens": [tid]})[1]["prompt"]
        for tid in ids
    }
    assert [text for _, _, text in rows] == [texts[tid] for _, tid, _ in rows]


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


def test_chat_stream_opens_each_choice_with_the_role_and_deltas_add_up(tiny_server):
    """OpenAI's and vLLM's shape: each choice's first chunk is `{"role": "assistant",
    "content": ""}` (the role came with the first text), the role in no later chunk."""
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
        "n": 2,
    }
    options = {"stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(f"{tiny_server.url}/v1/chat/completions", {**body, **options})
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    deltas: dict[int, list[dict]] = {0: [], 1: []}
    for ev in events[:-1]:
        for choice in ev["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            deltas[choice["index"]].append(choice["delta"])
            assert choice["logprobs"] is None
    for index in (0, 1):
        assert deltas[index][0] == {"role": "assistant", "content": ""}
        assert all("role" not in d for d in deltas[index][1:]), deltas
    assert events[-2]["usage"]["completion_tokens"] > 0
    _, whole = http_json("POST", f"{tiny_server.url}/v1/chat/completions", body)
    assert texts[0] == whole["choices"][0]["message"]["content"] == texts[1]


def test_continuous_usage_stats_puts_each_choices_usage_so_far_in_every_chunk(tiny_server):
    """vLLM's stream_options.continuous_usage_stats (it was ignored): every chunk carries its
    choice's prompt tokens and the tokens it has generated so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": ["hi", "hi there"], "max_tokens": 4, "ignore_eos": True, "n": 2}
    events = sse_events(
        f"{tiny_server.url}/v1/completions",
        {**body, "stream": True, "stream_options": options},
    )
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    prompt_lens = [prompt_len(tiny_server, p) for p in body["prompt"]]
    generated = [0] * 4
    for ev in events[:-2]:
        (choice,) = ev["choices"]
        generated[choice["index"]] = ev["usage"]["completion_tokens"]
        assert ev["usage"]["prompt_tokens"] == prompt_lens[choice["index"] // 2], ev
    assert generated == [4] * 4
    assert events[-2]["usage"]["completion_tokens"] == 16


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
    opening, *chunks = events[:-1]
    assert opening["choices"][0]["logprobs"] is None  # the role's chunk: no token yet
    entries = [e for ev in chunks for c in ev["choices"] for e in c["logprobs"]["content"]]
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
        'pdserve_requests_total{model_name="tiny-random",status="length"}',
        'pdserve_prompt_tokens_total{model_name="tiny-random"}',
        'pdserve_generation_tokens_total{model_name="tiny-random"}',
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
        'pdserve_num_running_reqs{dp_rank="0",model_name="tiny-random"}',
        'pdserve_kv_pages_free{dp_rank="0",model_name="tiny-random"}',
        'pdserve_kv_pages_used{dp_rank="0",model_name="tiny-random"}',
    ):
        assert name in text, name
    generated = [
        line
        for line in text.splitlines()
        if line.startswith('pdserve_generation_tokens_total{model_name="tiny-random"} ')
    ]
    assert float(generated[0].split()[1]) >= 6
