"""vLLM's `POST /tokenize` and `POST /detokenize`: the server's own tokenizer and chat
template over HTTP, on every role (colocated, prefill, decode). Front end."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pdserve.serving.hooks import RequestError
from pdserve.serving.openai_api import model_body
from pdserve.serving.openai_format import INERT_VALUES, render_chat_prompt
from pdserve.serving.request_parse import get_field, refuse_features
from pdserve.serving.server_state import off_loop, state_of

# The chat fields of vLLM's tokenize request that the chat route refuses too: a prompt
# rendered without them would pass for one rendered with them.
CHAT_INERT_VALUES = {name: INERT_VALUES[name] for name in ("chat_template", "tools")}


def tokenize_body(tokenizer: Any, body: dict) -> list[int]:
    """The token ids of a tokenize request: vLLM's completion form (`prompt`, a string;
    `add_special_tokens`, default true) or its chat form (`messages` through the chat
    template as /v1/chat/completions renders them; `add_special_tokens` default false)."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestError(400, "give exactly one of prompt (a string) or messages (a chat)")
    if messages is not None:
        refuse_features(body, CHAT_INERT_VALUES)
        return render_chat_prompt(tokenizer, messages, body)
    prompt = get_field(body, "prompt", str)
    special = get_field(body, "add_special_tokens", bool, True)
    return tokenizer.encode(prompt, add_special_tokens=special)


def detokenize_ids(body: dict, vocab_size: int | None) -> list[int]:
    """A detokenize request's `tokens`: a list of ids of the model's vocabulary."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise RequestError(400, "tokens must be a list of integers", param="tokens")
    outside = [t for t in tokens if vocab_size is not None and not 0 <= t < vocab_size]
    if outside:
        raise RequestError(
            400,
            f"tokens contain ids outside the vocabulary [0, {vocab_size}): {outside[:8]}",
            param="tokens",
        )
    return tokens


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await model_body(request)
    want_strs = get_field(body, "return_token_strs", bool, False)
    token_ids = await off_loop(request, tokenize_body, state.tokenizer, body)
    token_strs = state.tokenizer.convert_ids_to_tokens(token_ids) if want_strs else None
    return web.json_response(
        {
            "count": len(token_ids),
            "max_model_len": state.controller.max_context_len,
            "tokens": token_ids,
            "token_strs": token_strs,
        }
    )


async def detokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await model_body(request)
    token_ids = detokenize_ids(body, state.controller.vocab_size)
    text = await off_loop(request, state.tokenizer.decode, token_ids)
    return web.json_response({"prompt": text})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
