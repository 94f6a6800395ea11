"""OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`. Front end.

Bodies map onto the same `GenItem`s as /generate (n copies per prompt, one bootstrap room
per item); extras sent by SGLang's router are accepted and ignored, fields asking for a
feature pdserve lacks are refused.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pdserve.serving.completion_echo import echoed_delta, prompt_text, whole_delta
from pdserve.serving.generation import Delta, ItemResult, merged, run_all
from pdserve.serving.hooks import RequestError
from pdserve.serving.http_request_id import request_id
from pdserve.serving.openai_format import (
    MAX_N,
    chat_echo_text,
    chat_logprobs,
    completion_logprobs,
    end_offset,
    finish_fields,
    logprobs_count,
    model_not_found,
    refuse_unsupported,
    render_chat_prompt,
    turn_fields,
    usage,
)
from pdserve.serving.request_parse import (
    bad,
    cache_salt_of,
    get_field,
    item_pd_fields,
    make_item,
)
from pdserve.serving.server_state import (
    ServerState,
    client_gone,
    off_loop,
    read_json,
    state_of,
)

SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
)


MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


def max_tokens_field(body: dict) -> str:
    """The field that bounds the answer's length, as the client named it."""
    return "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"


def _sampling(body: dict, default_max_tokens: int, echo_only_ok: bool = False) -> dict[str, Any]:
    """`echo_only_ok`: a max_tokens of 0 may ask for the echoed prompt alone (completions'
    `echo`, vLLM's echo without generation); /generate's max_new_tokens may be 0 anyway,
    as SGLang's."""
    params = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    if get_field(body, "include_stop_str_in_output", bool, False) and "no_stop_trim" not in params:
        params["no_stop_trim"] = True  # vLLM's name for SGLang's no_stop_trim
    if body.get("min_tokens") is not None:
        params["min_new_tokens"] = body["min_tokens"]  # vLLM's name
    # Both fields are checked, the one that bounds the answer and the one it overrides: a
    # garbage max_tokens next to max_completion_tokens is a 400, as in vLLM (pydantic
    # checks every field), not silently dropped.
    # The bound is at least 1, as vLLM's (0 was served as an empty answer), the overridden
    # field at least 0.
    bound = max_tokens_field(body)
    least = {name: 0 if echo_only_ok or name != bound else 1 for name in MAX_TOKENS_FIELDS}
    limits = {name: _max_tokens(body, name, least[name]) for name in MAX_TOKENS_FIELDS}
    max_tokens = limits[bound]
    params["max_new_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    return params


def _max_tokens(body: dict, name: str, least: int) -> int | None:
    max_tokens = get_field(body, name, int, None)
    if max_tokens is not None and max_tokens < least:
        raise RequestError(400, f"{name} must be at least {least}, got {max_tokens}", param=name)
    return max_tokens


def stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of `stream_options`, checked as vLLM checks
    it: an object of booleans, and given only with `stream: true` (an empty object passes)."""
    options = get_field(body, "stream_options", dict, None)
    if not options:
        return False, False
    if not stream:
        raise RequestError(
            400,
            "Stream options can only be defined when `stream=True`.",
            param="stream_options",
        )
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            param = f"stream_options.{name}"
            raise RequestError(400, f"{param} must be a boolean, got {value!r}", param=param)
        flags.append(bool(value))
    return flags[0], flags[0] and flags[1]


def _copy_params(params: dict[str, Any], copy: int) -> dict[str, Any]:
    """The sampling of sample `copy` of a prompt's n: a seeded request seeds each sample
    with seed + copy (as vLLM does), else its n choices would all be the same."""
    seed = params.get("seed")
    if copy == 0 or not isinstance(seed, int) or isinstance(seed, bool):
        return params
    seed += copy
    return {**params, "seed": seed if seed < 2**64 else seed - 2**64}


def _items(
    state: ServerState,
    body: dict,
    prompts: list[list[int]],
    params: dict,
    logprobs: int | None,
    echo: bool = False,
    prompt_field: str = "prompt",
) -> tuple[list, int]:
    """(items, n): n samples of each prompt, in that order. `echo` with logprobs asks for
    the prompt's logprobs too; `prompt_field` is what the prompt's errors name."""
    n = get_field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise RequestError(400, f"n must be in [1, {MAX_N}], got {n}", param="n")
    num = len(prompts) * n
    salt = cache_salt_of(body)
    items = []
    for index in range(num):
        rid = body.get("rid")
        if isinstance(rid, list):
            rid = rid[index] if len(rid) == num else None
        elif rid is not None and num > 1:
            rid = f"{rid}-{index}"
        items.append(
            make_item(
                prompts[index // n],
                _copy_params(params, index % n),
                state.limits,
                item_pd_fields(body, index, num, state.limits, n),
                rid=rid,
                return_logprob=logprobs is not None,
                logprob_start_len=0 if echo else None,
                top_logprobs_num=logprobs or 0,
                max_tokens_field=max_tokens_field(body),
                openai=True,
                cache_salt=salt,
                prompt_field=prompt_field,
            )
        )
    return items, n


def _completion_prompts(state: ServerState, body: dict) -> list[str | list[int]]:
    """The prompts as sent: strings or token id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            return prompt
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
    raise bad(
        "prompt must be a string, a list of strings, or token ids (a list or list of lists)",
        "prompt",
    )


def _encoded(state: ServerState, prompts: list[str | list[int]], special: bool) -> list[list[int]]:
    """Text prompts tokenized, with the tokenizer's special tokens (BOS) unless the request's
    vLLM `add_special_tokens` is false (it was ignored: they were always added)."""
    encode = state.tokenizer.encode
    return [encode(p, add_special_tokens=special) if isinstance(p, str) else p for p in prompts]


def _choice(state: ServerState, result: ItemResult, echo_text: str | None, want_lp: bool) -> dict:
    """One choice of a whole completions answer; `echo_text` puts the prompt in front."""
    whole = whole_delta(result)
    if echo_text is not None:
        whole = echoed_delta(result, echo_text, whole)
    fields = _completion_delta(state, whole, True, want_lp, 0)
    return {**fields, **finish_fields(result)}


async def completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await _body(request)
    echo = get_field(body, "echo", bool, False)
    raw = body.get("logprobs")
    logprobs = None if raw is None else logprobs_count(raw, "logprobs")
    prompts = _completion_prompts(state, body)
    special = get_field(body, "add_special_tokens", bool, True)
    encoded = await off_loop(request, _encoded, state, prompts, special)
    items, n = _items(state, body, encoded, _sampling(body, 16, echo), logprobs, echo)
    request_id(request, items[0].rid)  # the answer's X-Request-Id, unless the client sent one
    # The prompt's text, echoed in front of each of its n choices' text.
    echoes = [prompt_text(state.tokenizer, p) for p in prompts for _ in range(n)] if echo else None
    meta = _meta(state, "cmpl")
    stream = get_field(body, "stream", bool, False)
    usage_opts = stream_options(body, stream)
    if stream:
        gone = client_gone(request)
        kind = "text_completion"
        events = _stream(state, items, n, meta, usage_opts, kind, _completion_delta, gone, echoes)
        return await sse_response_for(request, events)
    results = await run_all(state.generator, items, client_gone(request))
    choices = [
        {"index": i, **_choice(state, r, echoes[i] if echoes else None, logprobs is not None)}
        for i, r in enumerate(results)
    ]
    return web.json_response(
        {**meta, "object": "text_completion", "choices": choices, "usage": usage(results, n)}
    )


def _chat_top_logprobs(body: dict) -> int | None:
    """Alternatives per token when the request asks for logprobs, else None."""
    want_logprobs = get_field(body, "logprobs", bool, False)
    raw = body.get("top_logprobs")
    top = 0 if raw is None else logprobs_count(raw, "top_logprobs")
    if top and not want_logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return top if want_logprobs else None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await _body(request)
    prompt_ids = await off_loop(
        request, render_chat_prompt, state.tokenizer, body.get("messages"), body
    )
    echo_wanted = get_field(body, "echo", bool, False)
    echo = chat_echo_text(body["messages"], echo_wanted, turn_fields(body)["add_generation_prompt"])
    top = _chat_top_logprobs(body)
    # Without max_tokens a chat answer may use the rest of the context, as in vLLM and SGLang.
    default_max_tokens = state.limits.rest_of_context(len(prompt_ids))
    sampling = _sampling(body, default_max_tokens)
    items, n = _items(state, body, [prompt_ids], sampling, top, prompt_field="messages")
    request_id(request, items[0].rid)  # the answer's X-Request-Id, unless the client sent one
    meta = _meta(state, "chatcmpl")
    stream = get_field(body, "stream", bool, False)
    usage_opts = stream_options(body, stream)
    if stream:
        kind = "chat.completion.chunk"
        events = _stream(state, items, n, meta, usage_opts, kind, _chat_delta, client_gone(request))
        events = _chat_opening(meta, items, echo, usage_opts[1], events)
        return await sse_response_for(request, events)
    results = await run_all(state.generator, items, client_gone(request))
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": (echo or "") + r.text},
            "logprobs": chat_logprobs(
                state.generator.decoder, r.output_ids, r.output_logprobs, r.output_top_logprobs
            )
            if top is not None
            else None,
            **finish_fields(r),
        }
        for i, r in enumerate(results)
    ]
    return web.json_response(
        {**meta, "object": "chat.completion", "choices": choices, "usage": usage(results, n)}
    )


async def _chat_opening(
    meta: dict,
    items: list,
    echo: str | None,
    continuous_usage: bool,
    events: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """A chat stream's opening, as OpenAI and vLLM send it: one chunk per choice with
    `{"role": "assistant", "content": ""}`, then with `echo` (vLLM's) one with the echoed
    text, then the generated text (its first chunk carried the role). Sent once the first
    output is in, so a request that fails at dispatch still gets its HTTP status."""
    async with contextlib.aclosing(events):
        first = await anext(events, None)
        if first is None:
            return
        deltas = [{"role": "assistant", "content": ""}] + ([{"content": echo}] if echo else [])
        for delta in deltas:
            for index, item in enumerate(items):
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                chunk = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
                if continuous_usage:  # nothing generated yet
                    prompt_tokens = len(item.input_ids)
                    chunk["usage"] = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": 0,
                        "total_tokens": prompt_tokens,
                    }
                yield chunk
        yield first
        async for event in events:
            yield event


async def model_body(request: web.Request) -> dict:
    """The request's JSON object, its `model` (if any) one the server serves."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    check_model(body, state_of(request).cfg.model_names)
    return body


async def _body(request: web.Request) -> dict:
    body = await model_body(request)
    refuse_unsupported(body)
    return body


def check_model(body: dict, model_names: list[str]) -> None:
    """A `model` the server does not serve gets vLLM's 404; no `model` is accepted."""
    model = get_field(body, "model", str, None)
    if model is not None and model not in model_names:
        raise model_not_found(model)


def _meta(state: ServerState, prefix: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.cfg.served_model_name,
    }


def _completion_delta(
    state: ServerState, delta: Delta, first: bool, logprobs: bool, offset: int
) -> dict:
    if not logprobs:
        return {"text": delta.text, "logprobs": None}
    lp = completion_logprobs(
        state.generator.decoder, delta.token_ids, delta.logprobs, delta.top_logprobs, offset
    )
    return {"text": delta.text, "logprobs": lp}


def _chat_delta(state: ServerState, delta: Delta, first: bool, logprobs: bool, offset: int) -> dict:
    message: dict[str, Any] = {"content": delta.text}  # the role came in the opening chunk
    if not logprobs:
        return {"delta": message, "logprobs": None}
    lp = chat_logprobs(state.generator.decoder, delta.token_ids, delta.logprobs, delta.top_logprobs)
    return {"delta": message, "logprobs": lp}


async def _stream(
    state: ServerState,
    items: list,
    n: int,
    meta: dict,
    usage_opts: tuple[bool, bool],
    kind: str,
    make_delta,
    gone,
    echoes: list[str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """`usage_opts`: `stream_options` (include_usage, continuous_usage_stats); `echoes`:
    completions' prompt text per item, sent in front of its first delta."""
    results: dict[int, ItemResult] = {}
    offsets: dict[int, int] = {}  # completions logprobs: text offset of the next token
    # vLLM's continuous_usage_stats: every chunk has its choice's usage so far.
    include_usage, continuous_usage = usage_opts
    async for index, result, delta in merged(state.generator, items, gone):
        offset = offsets.get(index, 0)
        if echoes is not None and index not in results:
            delta = echoed_delta(result, echoes[index], delta)
        fields = make_delta(state, delta, index not in results, result.item.return_logprob, offset)
        logprobs = fields["logprobs"]
        if logprobs is not None and "text_offset" in logprobs:
            offsets[index] = end_offset(logprobs, offset)
        results[index] = result
        choice = {"index": index, **fields, **finish_fields(result)}
        chunk = {**meta, "object": kind, "choices": [choice]}
        yield chunk | {"usage": usage([result], 1)} if continuous_usage else chunk
    if include_usage:
        ordered = [results[i] for i in sorted(results)]
        yield {**meta, "object": kind, "choices": [], "usage": usage(ordered, n)}


async def sse_response_for(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    from pdserve.serving.streaming import sse_response

    return await sse_response(request, events)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
