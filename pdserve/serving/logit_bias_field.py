"""Parsing a request's `logit_bias` (OpenAI's shape: token id as a string key -> bias). Pure;
front end. Range checks (ids in the vocabulary, biases in [-100, 100], the entry cap) are
`SamplingParams.validate`'s, which the engine repeats."""

from __future__ import annotations

from typing import Any

from pdserve.engine.request import MAX_LOGIT_BIAS_ENTRIES, InvalidSampling


def parse_logit_bias(value: Any) -> dict[int, float]:
    """{token id: bias} from a JSON object whose keys are token ids (strings of decimal
    digits, as JSON has them, or ints) and whose values are numbers."""
    if not isinstance(value, dict):
        raise InvalidSampling("logit_bias", f"must be an object, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:  # before any work per entry
        raise InvalidSampling(
            "logit_bias",
            f"has {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
        )
    bias: dict[int, float] = {}
    for key, number in value.items():
        token_id = _token_id(key)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidSampling(
                "logit_bias", f"bias for token {key!r} must be a number, got {number!r}"
            )
        if token_id in bias:  # "5" and "05" name the same token
            raise InvalidSampling("logit_bias", f"token id {token_id} appears twice")
        bias[token_id] = float(number)
    return bias


def _token_id(key: Any) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.removeprefix("-").isdecimal() and len(key) <= 20:
        return int(key)  # 20 characters hold any 64-bit id; more would be slow to parse
    raise InvalidSampling("logit_bias", f"key {key!r} must be a token id (an integer)")
