"""Shapes of the OpenAI API: chat prompt rendering, logprobs, finish reasons, usage. Pure."""

from __future__ import annotations

from typing import Any

from pdserve.serving.generation import ItemResult
from pdserve.serving.request_parse import bad

MAX_N = 128  # choices per prompt (OpenAI `n`); the router refuses more the same way


def render_chat_prompt(tokenizer: Any, messages: Any, body: dict) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, assistant turn opened."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list")
    plain = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role")
        plain.append({"role": msg["role"], "content": _content_text(msg.get("content"), i)})
    kwargs = body.get("chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(
            plain,
            tokenize=False,
            add_generation_prompt=True,
            **(kwargs if isinstance(kwargs, dict) else {}),
        )
    except Exception as exc:  # a template that rejects the conversation is the client's 400
        raise bad(f"the chat template rejected the messages: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(f"messages[{index}].content: only text parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts")


def finish_reason(result: ItemResult) -> str | None:
    reason = result.finish_reason
    if reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.type, reason.type)


def usage(results: list[ItemResult]) -> dict[str, Any]:
    # n samples of one prompt share it: count each distinct prompt once, as OpenAI does.
    prompts = {tuple(r.item.input_ids) for r in results}
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.output_ids) for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
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
    tokenizer: Any, token_ids: list[int], logprobs: list[float], tops: Tops
) -> dict[str, Any]:
    """OpenAI completions `logprobs` (text offsets count from the start of these tokens)."""
    tokens, offsets, top_maps = [], [], []
    offset = 0
    for i, tid in enumerate(token_ids):
        token = _token_text(tokenizer, tid)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        row = tops[i] if i < len(tops) else []
        top_maps.append({_token_text(tokenizer, t): lp for t, lp in row or []})
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": top_maps,
        "text_offset": offsets,
    }
