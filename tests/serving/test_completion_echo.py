"""Completions logprobs and `echo` (the prompt's text, tokens and logprobs in front of the
answer's, as lm-evaluation-harness reads them) on a tiny-random server."""

from __future__ import annotations

import pytest

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.serving.tokenizer_loader import load_tokenizer
from tests.helpers import http_json, sse_events
from tests.serving.route_helpers import completions, prompt_len


@pytest.mark.parametrize("k", [0, 1])
def test_completion_top_logprobs_hold_the_sampled_token_as_openais_do(tiny_server, k):
    body = {"prompt": "a b", "max_tokens": 8, "seed": 3, "logprobs": k, "ignore_eos": True}
    status, out = http_json("POST", f"{tiny_server.url}/v1/completions", body)
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 8
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert token in top and len(top) <= k + 1


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
