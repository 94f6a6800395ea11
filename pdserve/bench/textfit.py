"""Text prompts that tokenize to an exact length with the served model's tokenizer.

Runs in the `pdserve bench` client (no I/O). Decoding random ids and re-encoding them does
not give back the same count, so the tail is re-fitted until the count is exact; the shared
head (a group prefix, trace blocks) is decoded block by block and never touched, so prompts
that share blocks share their text exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from pdserve.bench.workload import Prompt, random_ids

MAX_FIT_ROUNDS = 32


def allowed_token_ids(tokenizer: Any, text_safe: bool = False) -> list[int]:
    """Every id of the vocabulary except special tokens (they would end or reshape a prompt),
    added special tokens included: `all_special_ids` lists only the named ones. `text_safe`
    also drops ids that decode to nothing or to part of a UTF-8 character: the replacement
    character they become re-encodes to more tokens, and a fit would never settle."""
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update(i for i, token in added.items() if getattr(token, "special", False))
    ids = [i for i in range(len(tokenizer)) if i not in special]
    if not text_safe:
        return ids
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [i for i, text in zip(ids, texts, strict=True) if text and "\ufffd" not in text]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_token_count(tokenizer: Any, content: str) -> int:
    """Prompt tokens of a one-message chat, as a server with this tokenizer's template counts."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(out, "keys"):  # newer transformers return a BatchEncoding
        out = out["input_ids"]
    return len(out)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fit_tail(
    tokenizer: Any,
    count_tokens: Callable[[str], int],
    head_text: str,
    tail_ids: list[int],
    target_len: int,
    rng: np.random.Generator,
    allowed_ids: Sequence[int],
) -> str:
    """`head_text` + a tail grown or cut from `tail_ids` so that `count_tokens` gives
    exactly `target_len`. Raises ValueError when the head alone is too long or no tail fits."""
    tail_text = decode(tokenizer, tail_ids)
    last_diff, extra_cut = 0, 0
    for _ in range(MAX_FIT_ROUNDS):
        diff = target_len - count_tokens(head_text + tail_text)
        if diff == 0:
            return head_text + tail_text
        # a cut that changed nothing (the text ends inside a merge): cut deeper next time
        extra_cut = extra_cut + 1 if diff < 0 and diff == last_diff else 0
        last_diff = diff
        tail_ids = encode(tokenizer, tail_text, add_special_tokens=False)
        if diff > 0:
            tail_ids = tail_ids + random_ids(rng, allowed_ids, diff)
        elif len(tail_ids) + diff >= 0:
            tail_ids = tail_ids[: max(0, len(tail_ids) + diff - extra_cut)]
        else:
            raise ValueError(f"the shared head alone is longer than {target_len} tokens")
        tail_text = decode(tokenizer, tail_ids)
    raise ValueError(f"no text of exactly {target_len} tokens found in {MAX_FIT_ROUNDS} rounds")


def _head_text(tokenizer: Any, prompt: Prompt, cache: dict[tuple[int, ...], str]) -> str:
    parts, start = [], 0
    for block_len in prompt.shared_block_lens:
        block = tuple(prompt.input_ids[start : start + block_len])
        if block not in cache:
            cache[block] = decode(tokenizer, block)
        parts.append(cache[block])
        start += block_len
    return "".join(parts)


def attach_texts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool, seed: int) -> list[Prompt]:
    """Each prompt with `text` set: `input_len` tokens as a completions prompt, or as the
    templated user message of a chat when `chat` and the tokenizer has a chat template."""
    if chat and has_chat_template(tokenizer):

        def count(text: str) -> int:
            return chat_token_count(tokenizer, text)
    else:

        def count(text: str) -> int:
            return len(encode(tokenizer, text))

    rng = np.random.default_rng([seed, 2])
    allowed = allowed_token_ids(tokenizer, text_safe=True)
    cache: dict[tuple[int, ...], str] = {}
    out = []
    for prompt in prompts:
        head = _head_text(tokenizer, prompt, cache)
        tail = prompt.input_ids[sum(prompt.shared_block_lens) :]
        text = fit_tail(tokenizer, count, head, tail, prompt.input_len, rng, allowed)
        out.append(replace(prompt, text=text))
    return out
