"""Turning request bodies into validated `GenItem`s (one per prompt). Pure; front end.

Every problem becomes a `RequestError(400, message)` naming the field, so a bad request never
reaches a worker. The OpenAI routes build their items with `make_item` too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from pdserve.engine.request import INT64_MAX, InvalidSampling, SamplingParams
from pdserve.serving.cache_salt import CacheSaltError, body_salt_key
from pdserve.serving.hooks import RequestError
from pdserve.serving.logit_bias_field import parse_logit_bias
from pdserve.serving.pd_fields import (
    FIELD_NAMES,
    PDFieldError,
    PDFields,
    item_room,
    parse_pd_fields,
    per_prompt_entry,
)


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Limits:
    dp_size: int
    max_context_len: int
    vocab_size: int | None = None
    mode: str = "colocated"  # which PD fields a request must carry
    max_request_tokens: int | None = None  # prompt + output: the context or the pool, less
    # sampling fields a request that omits them takes (the model's generation_config.json)
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)

    def rest_of_context(self, prompt_len: int) -> int:
        """The output tokens a request may still add to a prompt of `prompt_len` (at least 1:
        a prompt that leaves none is refused with the reason where it is checked)."""
        limit = self.max_context_len
        if self.max_request_tokens is not None:
            limit = min(limit, self.max_request_tokens)
        return max(1, limit - prompt_len)


@dataclass
class GenItem:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int = 0
    pd: PDFields = field(default_factory=PDFields)
    cache_salt: str | None = None  # the salt's key: shares cached pages only under it


def bad(message: str, param: str | None = None) -> RequestError:
    """A 400; `param`: the field at fault, as the client named it."""
    return RequestError(400, message, param=param)


# SGLang sampling params pdserve does not implement, with the values that ask for none of it
# (see openai_format.INERT_VALUES for the OpenAI routes' fields).
SAMPLING_INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),  # SGLang's parallel sampling: send one prompt per sample instead
    "regex": (),
    "json_schema": (),
    "ebnf": (),
    "structural_tag": (),
    "stop_regex": (),
}
# SGLang /generate fields for features pdserve lacks (multimodal inputs, LoRA, embeddings,
# sessions, custom logit processors, logprobs of chosen ids): refused, never ignored.
# An empty list or string asks for nothing and passes.
GENERATE_INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "image_data": ([],),
    "audio_data": ([],),
    "video_data": ([],),
    "input_embeds": ([],),
    "lora_path": ("", []),
    "session_params": ({},),
    "custom_logit_processor": ("",),
    "token_ids_logprob": ([],),
}


def refuse_features(
    fields: dict, inert_values: dict[str, tuple[Any, ...]], prefix: str = ""
) -> None:
    """A 400 naming the first of `fields` that asks for a feature pdserve lacks: a value
    other than null or one of its inert values. Never ignored: an answer made without the
    penalty, grammar or bias would pass for one made with it."""
    for name, inert in inert_values.items():
        value = fields.get(name)
        # a boolean asks for nothing only where the inert value is that boolean (True != 1)
        if value is None or any(
            (type(value) is bool) == (type(v) is bool) and value == v for v in inert
        ):
            continue
        allowed = " or ".join(json.dumps(v) for v in inert)
        raise RequestError(
            400,
            f"{prefix}{name} is not supported by this server: leave it out"
            + (f" or send {allowed}" if allowed else ""),
            param=prefix + name,
        )


def cache_salt_of(body: dict) -> str | None:
    """The key of the request's prefix-cache salt (`cache_salt`, `extra_key`:
    serving/cache_salt.py), what its workers hash its pages under."""
    try:
        return body_salt_key(body)
    except CacheSaltError as exc:
        raise RequestError(400, str(exc), param=exc.param) from None


def get_field(body: dict, name: str, types: type | tuple, default: Any = None) -> Any:
    """body[name] checked against `types`; null or absent gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(400, f"{name} must be {_type_names(types)}, got {value!r}", param=name)
    if not isinstance(value, types):
        got = type(value).__name__
        raise RequestError(400, f"{name} must be {_type_names(types)}, got {got}", param=name)
    return value


def _type_names(types: type | tuple) -> str:
    names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join(
        {
            "str": "a string",
            "int": "an integer",
            "bool": "a boolean",
            "float": "a number",
            "list": "a list",
            "dict": "an object",
        }.get(n, n)
        for n in names
    )


def new_rid() -> str:
    return uuid.uuid4().hex


def per_item(body: dict, name: str, index: int, num_items: int) -> Any:
    value = body.get(name)
    if isinstance(value, list):
        if len(value) != num_items:
            raise bad(f"{name} has {len(value)} entries for {num_items} prompts", name)
        return value[index]
    return value


def item_pd_fields(body: dict, index: int, num_items: int, limits: Limits, n: int = 1) -> PDFields:
    """The PD fields of item `index`: each may be one value, a list of one per item, or
    (with `n` > 1 samples of each prompt) a list of one per prompt."""
    values = {name: _pd_entry(body, name, index, num_items, n) for name in FIELD_NAMES}
    if not isinstance(body.get("bootstrap_room"), list):  # one room for all: room + index
        values["bootstrap_room"] = item_room(values["bootstrap_room"], index, num_items)
    try:
        return parse_pd_fields(values, limits.dp_size, limits.mode)
    except PDFieldError as exc:
        raise bad(exc.message) from None


def _pd_entry(body: dict, name: str, index: int, num_items: int, n: int) -> Any:
    value = body.get(name)
    if n > 1 and isinstance(value, list) and len(value) * n == num_items:
        return per_prompt_entry(name, value, index, n)
    return per_item(body, name, index, num_items)


def sampling_from_dict(
    params: Any,
    prompt_len: int,
    limits: Limits,
    max_tokens_field: str = "max_new_tokens",
    openai: bool = False,
) -> SamplingParams:
    """`max_tokens_field`: what the client called max_new_tokens, for the error message;
    `openai`: the fields came at the top of an OpenAI body (errors name them as sent)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad("sampling_params must be an object", "sampling_params")
    params = {**limits.sampling_defaults, **{k: v for k, v in params.items() if v is not None}}
    refuse_features(params, SAMPLING_INERT_VALUES, "sampling_params.")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    room = limits.max_context_len - prompt_len
    if "max_new_tokens" not in params:
        params["max_new_tokens"] = min(SamplingParams().max_new_tokens, room)
    try:
        if "logit_bias" in params:
            params["logit_bias"] = parse_logit_bias(params["logit_bias"])
        sampling = msgspec.convert(params, SamplingParams)
        sampling.validate(limits.vocab_size)
    except InvalidSampling as exc:
        raise _invalid(exc, openai, max_tokens_field) from None
    except msgspec.ValidationError as exc:
        raise _mistyped(str(exc), openai, max_tokens_field) from None
    except ValueError as exc:
        raise bad(f"invalid sampling_params: {exc}") from None
    if sampling.max_new_tokens > room:
        raise RequestError(
            400,
            f"prompt ({prompt_len} tokens) + {max_tokens_field} ({sampling.max_new_tokens}) "
            f"exceeds the context length ({limits.max_context_len} tokens)",
            param=max_tokens_field if max_tokens_field != "max_new_tokens" else None,
        )
    return sampling


def _invalid(exc: InvalidSampling, openai: bool, max_tokens_field: str) -> RequestError:
    if not openai:
        return RequestError(
            400, f"invalid sampling_params: {exc}", param=f"sampling_params.{exc.field}"
        )
    name = _openai_name(exc.field, max_tokens_field)
    return RequestError(400, f"{name} {exc.problem}", param=name)


def _openai_name(field_name: str, max_tokens_field: str) -> str:
    openai_names = {"max_new_tokens": max_tokens_field, "min_new_tokens": "min_tokens"}
    return openai_names.get(field_name, field_name)


def _mistyped(message: str, openai: bool, max_tokens_field: str) -> RequestError:
    """msgspec's "Expected `int | null`, got `str` - at `$.seed`" as an error naming the
    field as the client sent it (message and param)."""
    problem, at, path = message.partition(" - at `$.")
    if not at:
        return bad(f"invalid sampling_params: {message}")
    field_name = path.rstrip("`").split(".")[0].split("[")[0]
    if not openai:
        param = f"sampling_params.{field_name}"
        return RequestError(400, f"invalid sampling_params: {field_name}: {problem}", param=param)
    name = _openai_name(field_name, max_tokens_field)
    return RequestError(400, f"{name}: {problem}", param=name)


def check_prompt(input_ids: Any, limits: Limits, field_name: str = "input_ids") -> list[int]:
    """`field_name`: the field the prompt came in (`input_ids`, `text`, `prompt`,
    `messages`), the errors' `param`."""
    if not isinstance(input_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in input_ids
    ):
        message = f"{field_name} must be a list of integers (or a list of such lists)"
        raise bad(message, field_name)
    if not input_ids:
        raise bad("the prompt is empty", field_name)
    if limits.vocab_size is not None and any(not 0 <= t < limits.vocab_size for t in input_ids):
        raise bad(
            f"{field_name} has token ids outside the vocabulary [0, {limits.vocab_size})",
            field_name,
        )
    if len(input_ids) >= limits.max_context_len:
        raise bad(
            f"the prompt has {len(input_ids)} tokens; the context length is "
            f"{limits.max_context_len} tokens",
            field_name,
        )
    return input_ids


def make_item(
    input_ids: Any,
    sampling_params: Any,
    limits: Limits,
    pd: PDFields,
    rid: Any = None,
    return_logprob: bool = False,
    logprob_start_len: int | None = None,
    top_logprobs_num: int = 0,
    max_tokens_field: str = "max_new_tokens",
    openai: bool = False,
    cache_salt: str | None = None,
    prompt_field: str = "input_ids",
) -> GenItem:
    """`prompt_field`: the field `input_ids` came from, which its errors name."""
    input_ids = check_prompt(input_ids, limits, prompt_field)
    if rid is not None and not isinstance(rid, str):
        raise bad(f"rid must be a string, got {rid!r}", "rid")
    if not 0 <= top_logprobs_num <= INT64_MAX:  # beyond 64 bits it cannot reach a worker
        raise bad(
            f"top_logprobs_num must be a 64-bit integer >= 0, got {top_logprobs_num}",
            "top_logprobs_num",
        )
    if logprob_start_len is not None and logprob_start_len < 0:
        logprob_start_len = None  # SGLang's -1: no prompt logprobs
    if logprob_start_len is not None and logprob_start_len >= len(input_ids):
        raise bad(
            f"logprob_start_len {logprob_start_len} is past the prompt ({len(input_ids)} tokens)",
            "logprob_start_len",
        )
    return GenItem(
        rid=rid or new_rid(),
        input_ids=input_ids,
        sampling=sampling_from_dict(
            sampling_params, len(input_ids), limits, max_tokens_field, openai
        ),
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len if return_logprob else None,
        top_logprobs_num=top_logprobs_num if return_logprob else 0,
        pd=pd,
        cache_salt=cache_salt,
    )


def parse_generate(body: Any, tokenizer: Encoder, limits: Limits) -> tuple[list[GenItem], bool]:
    """Native /generate body -> (items, is_batch)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    refuse_features(body, GENERATE_INERT_VALUES)
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise bad("give exactly one of text or input_ids")
    if text is not None:
        prompts, is_batch = _text_prompts(text, tokenizer)
    else:
        is_batch = (
            isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        )
        prompts = input_ids if is_batch else [input_ids]
    num = len(prompts)
    return_logprob = body.get("return_logprob", False)
    start = get_field(body, "logprob_start_len", int, None)
    top_n = get_field(body, "top_logprobs_num", int, 0)
    salt = cache_salt_of(body)
    items = []
    for i, prompt in enumerate(prompts):
        want_lp = (
            per_item(body, "return_logprob", i, num)
            if isinstance(return_logprob, list)
            else return_logprob
        )
        if not isinstance(want_lp, bool):
            raise bad(f"return_logprob must be a boolean, got {want_lp!r}", "return_logprob")
        params = body.get("sampling_params")
        if isinstance(params, list):
            params = per_item(body, "sampling_params", i, num)
        items.append(
            make_item(
                prompt,
                params,
                limits,
                item_pd_fields(body, i, num, limits),
                rid=_batch_rid(body.get("rid"), i, num, is_batch),
                return_logprob=want_lp,
                logprob_start_len=start,
                top_logprobs_num=top_n,
                cache_salt=salt,
                prompt_field="text" if text is not None else "input_ids",
            )
        )
    return items, is_batch


def _batch_rid(rid: Any, index: int, num_items: int, is_batch: bool) -> Any:
    """Item `index`'s rid: one string for a batch names each item `<rid>_<index>`, as
    SGLang names them (every item had the one rid, so the second was refused as a rid
    already in flight); a list gives one rid per item."""
    if is_batch and isinstance(rid, str):
        return f"{rid}_{index}"
    return per_item({"rid": rid}, "rid", index, num_items)


def _text_prompts(text: Any, tokenizer: Encoder) -> tuple[list[list[int]], bool]:
    if isinstance(text, str):
        return [tokenizer.encode(text)], False
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [tokenizer.encode(t) for t in text], True
    raise bad("text must be a string or a non-empty list of strings", "text")
