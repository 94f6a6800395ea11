"""SGLang's native `POST /generate`: single or batch, streaming or not, with logprobs.

Runs in the front end. Answers `{text, output_ids, meta_info}` (a list for a batch);
streamed chunks carry the text and ids so far, SGLang's default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from pdserve.serving.generation import ItemResult, merged, run_all
from pdserve.serving.http_request_id import request_id
from pdserve.serving.request_parse import get_field, parse_generate
from pdserve.serving.server_state import client_gone, off_loop, read_json, state_of
from pdserve.serving.streaming import sse_response

TokenText = Callable[[int], str | None]


def _no_text(token_id: int) -> None:
    return None


def token_texts(decoder: Any) -> TokenText:
    """SGLang's `return_text_in_logprobs`: each token's own text (its ids decoded one by one,
    special tokens kept), decoded once per request: a stream's chunks carry every logprob so
    far, alternatives included, and decoded them all again at each chunk."""
    texts: dict[int, str] = {}

    def text_of(token_id: int) -> str:
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = decoder.decode([token_id])
        return text

    return text_of


def _triples(pairs: list[tuple[int, float]] | None, text_of: TokenText) -> list[list] | None:
    return None if pairs is None else [[lp, tid, text_of(tid)] for tid, lp in pairs]


def logprob_fields(result: ItemResult, text_of: TokenText = _no_text) -> dict[str, Any]:
    """SGLang's format: [logprob, token_id, text-or-null] per token."""
    item = result.item
    fields: dict[str, Any] = {
        "output_token_logprobs": [
            [lp, tid, text_of(tid)]
            for lp, tid in zip(result.output_logprobs, result.output_ids, strict=False)
        ],
        "output_top_logprobs": [_triples(row, text_of) for row in result.output_top_logprobs],
    }
    if item.logprob_start_len is not None and result.prompt_logprobs is not None:
        prompt_ids = item.input_ids[item.logprob_start_len :]
        fields["input_token_logprobs"] = [
            [lp, tid, text_of(tid)]
            for lp, tid in zip(result.prompt_logprobs, prompt_ids, strict=False)
        ]
        tops = result.prompt_top_logprobs or []
        fields["input_top_logprobs"] = [_triples(row, text_of) for row in tops]
    else:
        fields["input_token_logprobs"] = []
        fields["input_top_logprobs"] = []
    return fields


def finish_reason_dict(result: ItemResult) -> dict[str, Any] | None:
    reason = result.finish_reason
    if reason is None:
        return None
    out = msgspec.structs.asdict(reason)
    if out.get("message") is None:
        out.pop("message", None)
    return out


def native_answer(
    result: ItemResult, index: int | None = None, text_of: TokenText = _no_text
) -> dict[str, Any]:
    item = result.item
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": finish_reason_dict(result),
        "prompt_tokens": len(item.input_ids),
        "completion_tokens": len(result.output_ids),
        "cached_tokens": result.cached_tokens,
        "e2e_latency": round(result.e2e_latency_s, 6),
    }
    if result.kv_transfer_bytes is not None:  # a PD server that moved this request's KV
        meta["kv_transfer_bytes"] = result.kv_transfer_bytes
        meta["decode_cached_tokens"] = result.decode_cached_tokens
    if item.return_logprob:
        meta.update(logprob_fields(result, text_of))
    answer = {"text": result.text, "output_ids": list(result.output_ids), "meta_info": meta}
    if index is not None:
        answer["index"] = index
    return answer


async def generate(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await read_json(request)
    items, is_batch = await off_loop(request, parse_generate, body, state.tokenizer, state.limits)
    request_id(request, items[0].rid)  # the answer's X-Request-Id, unless the client sent one
    # It was ignored: every logprob's text was null.
    want_text = get_field(body, "return_text_in_logprobs", bool, False)
    text_of = token_texts(state.generator.decoder) if want_text else _no_text
    if get_field(body, "stream", bool, False):
        gone = client_gone(request)
        return await sse_response(request, _stream(state.generator, items, is_batch, gone, text_of))
    results = await run_all(state.generator, items, client_gone(request))
    answers = [native_answer(r, text_of=text_of) for r in results]
    return web.json_response(answers if is_batch else answers[0])


async def _stream(
    generator, items, is_batch: bool, gone, text_of: TokenText
) -> AsyncIterator[dict[str, Any]]:
    async for index, result, _delta in merged(generator, items, gone):
        yield native_answer(result, index if is_batch else None, text_of)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
