"""Request bodies per endpoint, SSE line handling, stream parsing, Prometheus deltas."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.server_stats import counter_deltas, parse_prometheus
from pdserve.bench.streams import LineSplitter, StreamParser, build_body, sse_data
from pdserve.bench.workload import Prompt


def test_native_body_sends_input_ids_with_ignore_eos_in_sampling_params():
    body = build_body("generate", Prompt([1, 2, 3], 7), None, 0.0, True, {"rid": "x"})
    assert body["input_ids"] == [1, 2, 3] and body["stream"] is True and body["rid"] == "x"
    assert body["sampling_params"] == {"max_new_tokens": 7, "temperature": 0.0, "ignore_eos": True}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_openai_bodies_carry_text_usage_and_ignore_eos(endpoint: str):
    body = build_body(endpoint, Prompt([1], 9, text="hi"), "m", 0.5, True)
    assert body["model"] == "m" and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    if endpoint == "chat":
        assert body["messages"] == [{"role": "user", "content": "hi"}]
    else:
        assert body["prompt"] == "hi"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_openai_bodies_leave_out_ignore_eos_when_it_is_off(endpoint: str):
    """`--no-ignore-eos` still sent `"ignore_eos": false`, a field strict OpenAI-compatible
    servers refuse, so there was no way to leave it out."""
    body = build_body(endpoint, Prompt([1], 9, text="hi"), "m", 0.5, False)
    assert "ignore_eos" not in body and body["max_tokens"] == 9


def test_extra_sampling_params_join_the_bench_s_own_instead_of_replacing_them():
    extra = {"sampling_params": {"top_k": 5, "temperature": 0.7}}
    body = build_body("generate", Prompt([1, 2, 3], 7), None, 0.0, True, extra)
    want = {"max_new_tokens": 7, "temperature": 0.7, "ignore_eos": True, "top_k": 5}
    assert body["sampling_params"] == want


def test_extra_stream_options_keep_the_usage_the_bench_counts_tokens_by():
    extra = {"stream_options": {"continuous_usage_stats": True}}
    body = build_body("completions", Prompt([1], 9, text="hi"), "m", 0.5, True, extra)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_openai_body_without_text_is_refused():
    with pytest.raises(ValueError, match="needs prompt text"):
        build_body("chat", Prompt([1], 1), "m", 0.0, True)


def test_line_splitter_rejoins_lines_cut_across_reads():
    splitter = LineSplitter()
    assert splitter.feed(b'data: {"a"') == []
    assert splitter.feed(b": 1}\n\ndata: [DO") == [b'data: {"a": 1}', b""]
    assert splitter.feed(b"NE]\n") == [b"data: [DONE]"]
    assert splitter.flush() == []
    assert sse_data(b'data: {"a": 1}\r') == '{"a": 1}'
    assert sse_data(b": keep-alive") is None and sse_data(b"") is None


def native(ids: list[int], finish=None, **meta) -> str:
    return json.dumps(
        {"text": "", "output_ids": ids, "meta_info": {"finish_reason": finish, **meta}}
    )


def test_native_stream_counts_tokens_from_the_server():
    parser = StreamParser("generate")
    first = parser.feed(native([5], prompt_tokens=4, completion_tokens=1))
    assert first.has_new_tokens and first.completion_tokens == 1 and first.prompt_tokens == 4
    assert not parser.feed(native([5], completion_tokens=1)).has_new_tokens  # nothing new
    last = parser.feed(native([5, 6, 7], {"type": "length"}, completion_tokens=3))
    assert last.has_new_tokens and last.completion_tokens == 3 and last.finished


def test_native_stream_without_meta_counts_cumulative_output_ids():
    parser = StreamParser("generate")
    assert parser.feed(native([1, 2])).completion_tokens == 2


def test_native_abort_and_error_items_become_errors():
    abort = StreamParser("generate").feed(native([], {"type": "abort", "message": "KV lost"}))
    assert abort.error == "KV lost"
    error = StreamParser("generate").feed(json.dumps({"error": {"message": "too long"}}))
    assert error.error == "too long"


def test_openai_stream_counts_text_chunks_and_reads_usage():
    parser = StreamParser("chat")
    role = parser.feed(json.dumps({"choices": [{"delta": {"role": "assistant"}}]}))
    assert not role.has_new_tokens
    token = parser.feed(json.dumps({"choices": [{"delta": {"content": "Hi"}}]}))
    assert token.has_new_tokens
    end = parser.feed(json.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]}))
    assert end.finished and not end.has_new_tokens
    usage = parser.feed(
        json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}})
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 8)
    text = StreamParser("completions").feed(json.dumps({"choices": [{"text": " a"}]}))
    assert text.has_new_tokens


def test_an_openai_chunk_with_empty_text_still_carries_a_token():
    """pdserve and vLLM send a chunk per token, with "" for a token that ends inside a UTF-8
    character; the bench skipped those, so TTFT waited for the next token and ITL merged
    gaps (a chat run on tiny-random counted 67 gaps of 96)."""
    chat = StreamParser("chat")
    role = chat.feed(json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}))
    assert not role.has_new_tokens
    held = chat.feed(json.dumps({"choices": [{"delta": {"content": ""}}]}))
    assert held.has_new_tokens and held.text == ""
    thinking = chat.feed(json.dumps({"choices": [{"delta": {"content": None, "reasoning_content": "h"}}]}))  # fmt: skip
    assert thinking.has_new_tokens and thinking.text == "h"
    completion = StreamParser("completions").feed(json.dumps({"choices": [{"text": ""}]}))
    assert completion.has_new_tokens
    end = chat.feed(json.dumps({"choices": [{"delta": {}, "finish_reason": "stop"}]}))
    assert end.finished and not end.has_new_tokens


@pytest.mark.parametrize(
    ("endpoint", "payload"),
    [
        ("chat", '{"choices": ["x"]}'),
        ("completions", '{"usage": "x"}'),
        ("generate", '{"meta_info": [1]}'),
        ("generate", '{"meta_info": {"completion_tokens": "3"}}'),
        # taken as it was, it stopped the summary with TypeError after the whole run
        ("chat", '{"choices": [], "usage": {"completion_tokens": "3"}}'),
    ],
)
def test_a_stream_item_with_fields_of_the_wrong_type_is_a_value_error(endpoint, payload):
    """They raised AttributeError or TypeError, which no caller expects: the benchmark
    stopped with a traceback instead of failing the request as `bad_stream`."""
    with pytest.raises(ValueError, match="unexpected stream item"):
        StreamParser(endpoint).feed(payload)


METRICS_BEFORE = """# HELP pdserve_requests_total finished requests
# TYPE pdserve_requests_total counter
pdserve_requests_total{status="ok"} 3.0
pdserve_requests_created{status="ok"} 1.7e9
# TYPE pdserve_generation_tokens counter
pdserve_generation_tokens_total 30.0
# TYPE pdserve_num_running_reqs gauge
pdserve_num_running_reqs{dp_rank="0"} 2.0
# TYPE pdserve_e2e_seconds histogram
pdserve_e2e_seconds_bucket{le="1.0"} 3.0
pdserve_e2e_seconds_count 3.0
pdserve_e2e_seconds_sum 1.5
"""


def test_counter_deltas_keep_counters_and_histogram_totals_only():
    after = (
        METRICS_BEFORE.replace("} 3.0\npdserve_requests_created", "} 5.0\npdserve_requests_created")
        .replace("tokens_total 30.0", "tokens_total 50.0")
        .replace('status="ok"} 3.0', 'status="ok"} 5.0')
        .replace("_count 3.0", "_count 5.0")
        + 'pdserve_requests_total{status="error"} 1.0\nnot a metric line\n'
    )
    deltas = counter_deltas(METRICS_BEFORE, after)
    assert deltas == {
        'pdserve_requests_total{status="ok"}': 2.0,
        'pdserve_requests_total{status="error"}': 1.0,
        "pdserve_generation_tokens_total": 20.0,
        "pdserve_e2e_seconds_count": 2.0,
        "pdserve_e2e_seconds_sum": 0.0,
    }


def test_prometheus_parser_reads_types_and_labelled_samples():
    samples, types = parse_prometheus(METRICS_BEFORE)
    assert types["pdserve_requests_total"] == "counter"
    assert samples['pdserve_num_running_reqs{dp_rank="0"}'] == 2.0


def test_streams_carry_cached_tokens_and_the_answer():
    native = StreamParser("generate").feed(
        '{"text": "ab", "output_ids": [5, 6], "meta_info": {"completion_tokens": 2, '
        '"prompt_tokens": 9, "cached_tokens": 4, "finish_reason": null}}'
    )
    assert (native.cached_tokens, native.output_ids, native.text) == (4, [5, 6], "ab")
    parser = StreamParser("chat")
    delta = parser.feed('{"choices": [{"index": 0, "delta": {"content": "hi"}}]}')
    usage = parser.feed(
        '{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1, '
        '"prompt_tokens_details": {"cached_tokens": 8}}}'
    )
    assert (delta.text, delta.output_ids, usage.cached_tokens) == ("hi", None, 8)
