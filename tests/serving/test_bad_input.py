"""Bad requests get a 4xx naming the problem, and the server keeps serving afterwards."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import pytest
import requests

from tests.conftest import TINY_ARGS
from tests.helpers import (
    checks_answered_while_pending,
    http_json,
    raw_exchange,
    send_part_and_leave,
    wait_until,
)

CHAT = [{"role": "user", "content": "x"}]
GOOD = {"text": "still alive?", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/generate", {"text": ""}, "empty"),
        ("/generate", {"input_ids": []}, "empty"),
        ("/generate", {"text": 3}, "text must be"),
        ("/generate", {"input_ids": [1, "x"]}, "input_ids"),
        ("/generate", {"input_ids": [10**9]}, "vocabulary"),
        ("/generate", {"input_ids": [1] * 5000}, "context length"),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -4}}, "max_new_tokens"),
        (
            "/generate",
            {"text": "a", "sampling_params": {"max_new_tokens": 10**8}},
            "context length",
        ),
        ("/generate", {"text": "a", "sampling_params": {"temperature": "hot"}}, "temperature"),
        ("/generate", {"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
        ("/generate", {"text": "a", "stream": "yes"}, "stream"),
        ("/generate", {"text": "a", "routed_dp_rank": 1}, "out of range"),
        ("/generate", {"text": "a", "data_parallel_rank": -1}, "out of range"),
        ("/generate", {"text": "a", "bootstrap_room": "r"}, "bootstrap_room"),
        ("/generate", [], "JSON object"),
        ("/v1/completions", {"prompt": 7}, "prompt"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens must be at least 1"),
        # vLLM's bound (0 was served as an empty answer); an echo alone may ask for 0
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ("/v1/completions", {"prompt": "a", "max_completion_tokens": 0}, "max_completion_tokens must be at least 1, got 0"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0, "stream": True}, "max_completion_tokens must be at least 1"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0, "echo": True}, "max_tokens must be at least 1"),
        ("/v1/completions", {"prompt": "a", "n": 0}, "n must be"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 5},
            "chat_template_kwargs must be an object",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_p": 2},
            "top_p",
        ),
        # vLLM's rule: stream_options only with stream true (it was accepted and ignored).
        ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
        ("/v1/chat/completions", {"messages": CHAT, "stream": False, "stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
        ("/v1/chat/completions", {"messages": CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage must be a boolean"),
        ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": 5}, "stream_options must be an object"),
        # max_tokens is checked though max_completion_tokens overrides it (it was dropped).
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "lots", "max_completion_tokens": 2}, "max_tokens must be an integer"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -5, "max_completion_tokens": 2}, "max_tokens must be at least 0"),
        ("/abort_request", {"rid": 5}, "rid"),
        ("/abort_request", {"rid": "r", "bootstrap_room": "7"}, "bootstrap_room must be an integer"),
        # Past 64 bits an int cannot reach a worker: a 400 naming the field, not a 500.
        ("/generate", {"text": "a", "sampling_params": {"seed": 2**64}}, "seed"),
        ("/generate", {"text": "a", "sampling_params": {"top_k": 2**70}}, "top_k"),
        ("/generate", {"text": "a", "sampling_params": {"stop_token_ids": [2**70]}}, "stop_token_ids"),
        ("/generate", {"text": "a", "return_logprob": True, "top_logprobs_num": 2**70}, "top_logprobs_num"),
        ("/v1/completions", {"prompt": "a", "seed": -(2**70)}, "seed"),
        ("/v1/completions", {"prompt": "a", "logprobs": 2**70}, "logprobs must be"),
    ],
)  # fmt: skip
def test_bad_request_is_4xx_with_a_message(tiny_server, path, body, needle):
    status, out = http_json("POST", tiny_server.url + path, body)
    assert 400 <= status < 500, out
    assert needle in out["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"prompt": [[[1]]]}, "prompt"),
        ("/v1/completions", {"prompt": [10**6]}, "prompt"),
        ("/v1/completions", {"prompt": list(range(5, 9)) * 1100}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 5000}]}, "messages"),
        ("/v1/completions", {"prompt": "x", "rid": 5}, "rid"),
        ("/generate", {"text": []}, "text"),
        ("/generate", {"text": "x " * 5000}, "text"),
        ("/generate", {"input_ids": [10**6]}, "input_ids"),
        ("/generate", {"text": "x", "return_logprob": "yes"}, "return_logprob"),
    ],
)  # fmt: skip
def test_a_bad_prompt_or_message_names_its_field_in_param(tiny_server, path, body, param):
    """They came with `param` null: a client could not tell which field was at fault."""
    status, out = http_json("POST", tiny_server.url + path, body)
    assert status == 400 and out["error"]["param"] == param, out


def test_malformed_json_and_unknown_route(tiny_server):
    status, out = post_raw(f"{tiny_server.url}/generate", b"{not json")
    assert status == 400 and "malformed JSON" in out["error"]["message"]
    status, out = post_raw(f"{tiny_server.url}/generate", b"[" * 3000 + b"]" * 3000)
    assert status == 400 and "nested too deeply" in out["error"]["message"]
    status, out = http_json("GET", f"{tiny_server.url}/no_such_route")
    assert status == 404 and "error" in out


def test_one_rid_for_a_generate_batch_names_each_item_as_sglang_does(tiny_server):
    """Every item had the one rid, so the second was refused as already in flight."""
    body = {"text": ["a", "b"], "rid": "batch", "sampling_params": {"max_new_tokens": 1}}
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 200, out
    assert [o["meta_info"]["id"] for o in out] == ["batch_0", "batch_1"]


def test_duplicate_in_flight_rid_is_rejected(tiny_server):
    body = {
        "input_ids": [[1, 2], [3, 4]],
        "rid": ["dup", "dup"],
        "sampling_params": {"max_new_tokens": 50},
    }
    status, out = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 400 and "already in flight" in out["error"]["message"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"text": "a", "sampling_params": {"temperature": NaN}}', "NaN is not JSON"),
        (b'{"text": "a", "sampling_params": {"top_k": -Infinity}}', "-Infinity is not JSON"),
        # Past a double's range: read as inf, temperature 1e400 was served (the router: 400)
        (b'{"text": "a", "sampling_params": {"temperature": 1e400}}', "1e400 is out of range"),
        (b'{"text": "a", "sampling_params": {"seed": ' + b"9" * 5000 + b"}}", "digits"),
        (b'{"text": "\\ud800 lone"}', "lone UTF-16 surrogate"),
        (b'{"text": "a", "rid": "\\udfff"}', "lone UTF-16 surrogate"),
    ],
)
def test_bodies_that_are_not_strict_json_text_are_a_400(tiny_server, data, needle):
    status, out = post_raw(f"{tiny_server.url}/generate", data)
    assert status == 400 and needle in out["error"]["message"], out


def test_a_body_that_is_not_the_gzip_it_claims_is_a_400(tiny_server):
    url = f"{tiny_server.url}/generate"
    resp = requests.post(url, data=b"\x1f\x8b not gzip", headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 400, resp.text
    assert "unreadable body" in resp.json()["error"]["message"]
    good = gzip.compress(json.dumps(GOOD).encode())
    assert requests.post(url, data=good, headers={"Content-Encoding": "gzip"}).status_code == 200


def test_a_surrogate_pair_is_text(tiny_server):
    status, out = post_raw(
        f"{tiny_server.url}/generate",
        b'{"text": "\\ud83d\\ude00", "sampling_params": {"max_new_tokens": 1}}',
    )
    assert status == 200, out


def test_server_still_serves_after_bad_requests(tiny_server):
    status, out = http_json("POST", f"{tiny_server.url}/generate", GOOD)
    assert status == 200 and len(out["output_ids"]) >= 1
    status, load = http_json("GET", f"{tiny_server.url}/get_load")
    assert load[0]["num_inflight_reqs"] == 0  # no refused request left behind
    # The worker's own count comes in its periodic load report: it may lag the answer.
    wait_until(
        lambda: http_json("GET", f"{tiny_server.url}/get_load")[1][0]["num_reqs"] == 0,
        30,
        "the worker to report no requests",
    )


def test_a_client_that_leaves_mid_body_is_one_log_line_not_a_traceback(tiny_server):
    """A client event, not a server error: it once logged a traceback at ERROR (the handler's
    cancellation lost to the body read's ConnectionResetError). Nothing stays in flight."""
    offset = len(tiny_server.output())
    paths = ["/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"]
    for path in paths:
        for reset in (False, True):
            send_part_and_leave(tiny_server.url, "POST", path, reset)
    line = "the client left before its body was complete"
    wait_until(
        lambda: tiny_server.output()[offset:].count(line) == 2 * len(paths),
        30,
        "one log line per client that left",
    )
    log = tiny_server.output()[offset:]
    assert "Traceback" not in log and " ERROR " not in log, log
    status, out = http_json("POST", f"{tiny_server.url}/generate", GOOD)
    assert status == 200 and len(out["output_ids"]) >= 1
    status, load = http_json("GET", f"{tiny_server.url}/get_load")
    assert load[0]["num_inflight_reqs"] == 0, load


def test_a_request_the_engine_rejects_is_a_400_from_the_worker(server_factory):
    # The pool holds 64 tokens: the front end's checks pass, the worker's engine refuses.
    server = server_factory(["--model-path", "tiny-random", "--max-total-tokens", "64"])
    status, out = http_json(
        "POST",
        f"{server.url}/generate",
        {"input_ids": list(range(1, 100)), "sampling_params": {"max_new_tokens": 4}},
    )
    assert status == 400, out
    assert "pool" in out["error"]["message"]
    status, out = http_json(
        "POST",
        f"{server.url}/generate",
        {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}},
    )
    assert status == 200 and len(out["output_ids"]) == 4
    # A chat without max_tokens may use the rest of the context, as in vLLM and SGLang:
    # here the pool, smaller than the context, is the bound (not a default of 128).
    chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    status, out = http_json("POST", f"{server.url}/v1/chat/completions", chat)
    assert status == 200, out
    usage = out["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64, usage
    assert out["choices"][0]["finish_reason"] == "length"


def test_an_oversized_or_unfinished_body_is_answered_not_waited_for(server_factory):
    server = server_factory([*TINY_ARGS, "--request-timeout-s", "2"])
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Declared past the 64 MiB limit: refused at once, not after the bytes that never come.
    answer = raw_exchange(server.url, head + b"Content-Length: 1000000000000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"over" in answer
    # Declared 100 bytes, sent 1: refused at the request deadline.
    answer = raw_exchange(server.url, head + b"Content-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"not complete within 2 s" in answer
    status, out = http_json("POST", f"{server.url}/generate", GOOD)
    assert status == 200 and len(out["output_ids"]) >= 1


def test_prompt_ids_are_checked_against_the_model_vocabulary_not_the_tokenizer(
    server_factory, tmp_path
):
    """Checkpoints pad the embedding past the tokenizer (Qwen: 151936 rows for 151665
    tokens): every id below the model's vocab_size is a valid prompt id, none above it."""
    from pdserve.engine.tiny_random import EOS_TOKEN_ID, build_tokenizer
    from tests.engine.families import build_llama_odd_heads

    num_tokens = build_tokenizer(str(tmp_path))
    vocab_size = num_tokens + 11
    build_llama_odd_heads(tmp_path, vocab_size=vocab_size, eos_token_id=EOS_TOKEN_ID)
    server = server_factory(["--model-path", str(tmp_path)])
    body = {"input_ids": [5, num_tokens + 3], "sampling_params": {"max_new_tokens": 2}}
    status, out = http_json("POST", f"{server.url}/generate", body)
    assert status == 200 and len(out["output_ids"]) == 2, out
    body["input_ids"] = [5, vocab_size]
    status, out = http_json("POST", f"{server.url}/generate", body)
    assert status == 400 and f"[0, {vocab_size})" in out["error"]["message"], out


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_huge_text_prompt_is_tokenized_without_stalling_other_requests(tiny_server, path):
    """1 MB of text takes the tokenizer about a second; on the event loop it answered no one
    meanwhile, /health included (12 MB: 15 s, and the router took the server out). The
    health checks answered while the huge prompt is tokenized show the loop free."""
    text = "hello " * 170_000
    body = {
        "/generate": {"text": text},
        "/v1/completions": {"prompt": text},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}]},
    }[path]
    answer, answered = checks_answered_while_pending(tiny_server.url, path, body)
    assert answer.startswith(b"HTTP/1.1 400") and b"context length" in answer, answer
    assert answered >= 5, f"only {answered} health checks answered during tokenization"
