"""`echo` of /v1/completions, as vLLM answers it: the prompt's text, tokens and logprobs in
front of the completion's (the first prompt token has a null logprob). Pure; front end."""

from __future__ import annotations

from typing import Any

from pdserve.serving.generation import Delta, ItemResult


def prompt_text(tokenizer: Any, prompt: str | list[int]) -> str:
    """A prompt's text as echoed: a text prompt as the client sent it, token ids decoded."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def echoed_delta(result: ItemResult, text: str, delta: Delta) -> Delta:
    """`delta` with the prompt of `result` in front: a choice's first (or only) piece.
    Prompt logprobs the server did not compute (a decode server in PD: they are on the
    prefill side) are null, for the router to fill in from the prefill server's answer."""
    ids = result.item.input_ids
    logprobs = result.prompt_logprobs or [None] * len(ids)
    tops = result.prompt_top_logprobs or [None] * len(ids)
    return Delta(
        text + delta.text,
        [*ids, *delta.token_ids],
        [*logprobs, *delta.logprobs],
        [*tops, *(delta.top_logprobs or [[] for _ in delta.token_ids])],
    )


def whole_delta(result: ItemResult) -> Delta:
    """A finished item's whole completion, as one delta."""
    return Delta(result.text, result.output_ids, result.output_logprobs, result.output_top_logprobs)
