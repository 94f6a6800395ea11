"""Shapes of the OpenAI API: chat prompt rendering, logprobs, finish reasons, usage. Pure."""

from __future__ import annotations

import json
from typing import Any

from pdserve.serving.generation import ItemResult
from pdserve.serving.hooks import RequestError
from pdserve.serving.request_parse import bad, get_field, refuse_features

MAX_N = 128  # choices per prompt (OpenAI `n`); the router refuses more the same way
MAX_LOGPROBS = 20  # alternatives per token (`logprobs`, `top_logprobs`), vLLM's default cap

# Features pdserve does not implement, with the values that ask for none of it. Any other
# value is refused with a 400: a client must not take an answer made without it for one
# made with it. (SGLang's and vLLM's structured-output extras ask for something when set.)
INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "suffix": ("",),
    "regex": (),
    "json_schema": (),
    "ebnf": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "structural_tag": (),  # SGLang's
    "prompt_logprobs": (),  # vLLM's (echo with logprobs gives completions' prompt logprobs)
    # vLLM's per-request template: refused there too unless --trust-request-chat-template
    # (a client's template runs in the server); it was ignored here, the server's applied.
    "chat_template": (),
    # vLLM's sampling and output extras: ignored, they gave an answer made without them.
    "allowed_token_ids": (),
    "bad_words": ([],),
    "use_beam_search": (False,),
    "length_penalty": (1.0,),  # beam search's
    "truncate_prompt_tokens": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "logits_processors": ([],),
    "prompt_embeds": (),
}


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field that asks for a feature pdserve lacks (null is absent)."""
    refuse_features(body, INERT_VALUES)
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise RequestError(
            400, "best_of is not supported by this server: leave it out or send n", param="best_of"
        )


def model_not_found(model: str) -> RequestError:
    """vLLM's answer to a model name the server does not serve."""
    return RequestError(
        404, f"The model `{model}` does not exist.", kind="NotFoundError", param="model"
    )


def logprobs_count(value: Any, name: str) -> int:
    """The number of alternatives per token a `logprobs`/`top_logprobs` field asks for."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(
            400, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}", param=name
        )
    return value


def render_chat_prompt(tokenizer: Any, messages: Any, body: dict) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, assistant turn opened."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    plain = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        plain.append(_template_message(msg, i))
    kwargs = body.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise RequestError(
            400, f"chat_template_kwargs must be an object, got {type(kwargs).__name__}",
            param="chat_template_kwargs",
        )  # fmt: skip
    # vLLM's order: the request's fields, then chat_template_kwargs over them.
    kwargs = {**turn_fields(body), **kwargs}
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, **kwargs)
    except Exception as exc:  # a template that rejects the conversation is the client's 400
        raise bad(f"the chat template rejected the messages: {exc}", "messages") from None
    # vLLM's `add_special_tokens` (default false: the template writes them); it was ignored.
    special = get_field(body, "add_special_tokens", bool, False)
    return tokenizer.encode(text, add_special_tokens=special)


def turn_fields(body: dict) -> dict[str, bool]:
    """vLLM's `add_generation_prompt` (default true: open the assistant's turn) and
    `continue_final_message` (leave the last message open for the answer to continue),
    which were ignored: the answer always began a new assistant turn."""
    fields = {
        "add_generation_prompt": get_field(body, "add_generation_prompt", bool, True),
        "continue_final_message": get_field(body, "continue_final_message", bool, False),
    }
    if all(fields.values()):
        raise RequestError(
            400,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    return fields


def _template_message(msg: dict, index: int) -> dict[str, Any]:
    """What the chat template sees of one message, as vLLM gives it: role and text, and the
    `name`, `tool_call_id` and assistant `tool_calls` the client sent (templates render
    them; dropped, a conversation with tool turns reached the model with those turns
    empty). Tool call arguments become objects, the form templates expect (vLLM's rule)."""
    out: dict[str, Any] = {"role": msg["role"], "content": _content_text(msg.get("content"), index)}
    for key in ("name", "tool_call_id"):
        value = msg.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise bad(f"messages[{index}].{key} must be a string", f"messages[{index}].{key}")
            out[key] = value
    calls = msg.get("tool_calls")
    if calls is not None and msg["role"] == "assistant":
        out["tool_calls"] = _tool_calls(calls, index)
    return out


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(
                f"{where}[{j}] must be an object with a function that has a string name",
                f"{where}[{j}]",
            )
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                param = f"{where}[{j}].function.arguments"
                raise bad(f"{param} is not valid JSON", param) from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def chat_echo_text(messages: list, echo: bool, add_generation_prompt: bool = True) -> str | None:
    """What chat's `echo` puts in front of each answer (vLLM's rule): the last message's
    text when that message has the role the answer continues (the assistant's, or with
    `add_generation_prompt` false the last message's own); else None."""
    if not echo:
        return None
    last = messages[-1]
    if add_generation_prompt and last.get("role") != "assistant":
        return None
    return _content_text(last.get("content"), len(messages) - 1) or None


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # text parts joined by newlines, as vLLM joins them
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                where = f"messages[{index}].content"
                raise bad(f"{where}: only text parts are supported", where)
            text = part.get("text")
            if not isinstance(text, str):  # vLLM's schema: a text part's text is a string
                where = f"messages[{index}].content[{j}].text"
                raise RequestError(400, f"{where} must be a string, got {text!r}", param=where)
            parts.append(text)
        return "\n".join(parts)
    where = f"messages[{index}].content"
    raise bad(f"{where} must be a string or a list of text parts", where)


def finish_reason(result: ItemResult) -> str | None:
    reason = result.finish_reason
    if reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.type, reason.type)


def finish_fields(result: ItemResult) -> dict[str, Any]:
    """A choice's `finish_reason`, with what stopped it: vLLM's `stop_reason` (the stop string
    or stop_token_ids id matched; null at EOS or the length limit) and SGLang's `matched_stop`
    (the same, EOS id included). Both were missing: a client could not tell which of its stop
    strings ended the answer."""
    reason = result.finish_reason
    matched = reason.matched if reason is not None and reason.type == "stop" else None
    stop_ids = result.item.sampling.stop_token_ids or ()
    by_stop_field = isinstance(matched, str) or (matched is not None and matched in stop_ids)
    return {
        "finish_reason": finish_reason(result),
        "stop_reason": matched if by_stop_field else None,
        "matched_stop": matched,
    }


def usage(results: list[ItemResult], n: int) -> dict[str, Any]:
    """Usage of items in request order, `n` per prompt: the n samples of one prompt share it,
    so it counts once (as OpenAI counts it), with the cached tokens of its first sample."""
    firsts = results[::n]
    prompt_tokens = sum(len(r.item.input_ids) for r in firsts)
    completion_tokens = sum(len(r.output_ids) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)},
    }


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


Tops = list[list[tuple[int, float]]]


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[float], tops: Tops
) -> dict[str, Any]:
    """OpenAI chat `logprobs` for these tokens (a whole answer or one streamed delta)."""
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        token = _token_text(tokenizer, tid)
        row = tops[i] if i < len(tops) else []
        content.append(
            {
                "token": token,
                "logprob": lp,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {
                        "token": (t := _token_text(tokenizer, top_id)),
                        "logprob": top_lp,
                        "bytes": list(t.encode()),
                    }
                    for top_id, top_lp in row or []
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[list[tuple[int, float]] | None],
    offset: int = 0,
) -> dict[str, Any]:
    """OpenAI completions `logprobs`; text offsets count from `offset`, the characters of the
    tokens before these (a streamed delta's offsets continue the previous ones). Each
    `top_logprobs` entry holds the sampled token too, as OpenAI's (up to logprobs + 1)."""
    tokens, offsets, top_maps = [], [], []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        token = _token_text(tokenizer, tid)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if lp is None:  # the first prompt token of an echo: nothing before it to predict it
            top_maps.append(None)
            continue
        row = tops[i] if i < len(tops) else []
        top = {_token_text(tokenizer, t): top_lp for t, top_lp in row or []}
        top.setdefault(token, lp)
        top_maps.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": top_maps,
        "text_offset": offsets,
    }


def end_offset(logprobs: dict[str, Any], offset: int) -> int:
    """The text offset after a completions `logprobs` object whose tokens start at `offset`."""
    tokens = logprobs["tokens"]
    return logprobs["text_offset"][-1] + len(tokens[-1]) if tokens else offset
