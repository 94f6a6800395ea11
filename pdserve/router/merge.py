"""Reading worker answers (router process; pure): error messages, server-sent events, and
putting prefill's prompt logprobs into decode's answer (/generate with return_logprob, and
/v1/completions with echo and logprobs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

# meta_info fields that describe the prompt; prefill computes them, decode's are partial.
PROMPT_FIELDS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode


def error_message(body: bytes, status: int | None = None) -> str:
    """The message of a worker's error body, whatever its shape."""
    try:
        data = _json_decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(err.get(key), str):
                    return err[key]
        if isinstance(err, str):
            return err
        if isinstance(data.get("detail"), str):
            return data["detail"]
    return str(data)[:500]


class ErrorDetails(NamedTuple):
    kind: str | None = None  # the error's `type`
    param: str | None = None
    origin: str | None = None  # "prefill": a decode server's error its prefill peer caused


def error_details(body: bytes) -> ErrorDetails:
    """`type`, `param` and `origin` of a worker's OpenAI-shaped error body; None where it
    has none."""
    try:
        data = _json_decode(body)
    except msgspec.DecodeError:
        return ErrorDetails()
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return ErrorDetails()
    fields = (err.get("type"), err.get("param"), err.get("origin"))
    return ErrorDetails(*(value if isinstance(value, str) else None for value in fields))


class SSEBuffer:
    """Splits a byte stream into whole server-sent events (each ends with a blank line)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        if b"\n\n" not in self._pending:
            return []
        *events, self._pending = self._pending.split(b"\n\n")
        return [e + b"\n\n" for e in events if e.strip()]

    def rest(self) -> bytes:
        return self._pending


def event_json(event: bytes) -> Any | None:
    """The JSON payload of a `data: ...` event; None for [DONE], comments and non-JSON."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return None
            try:
                return _json_decode(payload)
            except msgspec.DecodeError:
                return None
    return None


def event_error(obj: Any) -> str | None:
    """The message of an in-stream error object (`{"error": ...}`), else None."""
    if isinstance(obj, dict) and "error" in obj and obj["error"]:
        return error_message(_json_encode(obj))
    return None


def sse_event(obj: Any) -> bytes:
    return b"data: " + _json_encode(obj) + b"\n\n"


def prompt_fields_of(item: Any) -> dict[str, Any]:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {k: meta[k] for k in PROMPT_FIELDS if isinstance(meta.get(k), list) and meta[k]}


def prefill_prompt_fields(body: bytes, streamed: bool) -> dict[int, dict[str, Any]]:
    """Prompt logprob fields of prefill's answer, by batch index."""
    if streamed:
        found: dict[int, dict[str, Any]] = {}
        buf = SSEBuffer()
        for event in buf.feed(body + b"\n\n"):
            obj = event_json(event)
            fields = prompt_fields_of(obj)
            index = obj.get("index", 0) if isinstance(obj, dict) else 0
            if fields and index not in found:
                found[index] = fields
        return found
    try:
        data = _json_decode(body)
    except msgspec.DecodeError:
        return {}
    items = data if isinstance(data, list) else [data]
    return {i: f for i, item in enumerate(items) if (f := prompt_fields_of(item))}


def merge_item(item: Any, fields: dict[str, Any] | None) -> bool:
    """Put prefill's prompt fields in front of decode's, where decode has the field."""
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not fields or not isinstance(meta, dict):
        return False
    changed = False
    for key, prefix in fields.items():
        if key in meta:
            meta[key] = prefix + (meta[key] or [])
            changed = True
    return changed


def merge_response(decode_body: bytes, fields: dict[int, dict[str, Any]]) -> bytes:
    """A non-streamed /generate answer (one object or a batch list) with prompt fields merged."""
    if not fields:
        return decode_body

    def merge(data: Any) -> bool:
        items = data if isinstance(data, list) else [data]
        return any([merge_item(item, fields.get(i)) for i, item in enumerate(items)])

    return _rewritten(decode_body, merge)


def _rewritten(body: bytes, change: Callable[[Any], bool]) -> bytes:
    """`body` re-encoded after `change` edited its JSON in place; as it was if nothing
    changed or it is not JSON."""
    try:
        data = _json_decode(body)
    except msgspec.DecodeError:
        return body
    return _json_encode(data) if change(data) else body


class StreamMerger:
    """Merges prefill's prompt fields into each streamed /generate event that carries them:
    like the colocated server's, every event repeats the whole prompt's logprobs."""

    def __init__(self, fields: dict[int, dict[str, Any]]):
        self._fields = fields

    def process(self, event: bytes) -> bytes:
        if not self._fields:
            return event
        obj = event_json(event)
        if not isinstance(obj, dict):
            return event
        if merge_item(obj, self._fields.get(obj.get("index", 0))):
            return sse_event(obj)
        return event


def _choices(obj: Any) -> list[dict[str, Any]]:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _index(choice: dict[str, Any]) -> int | None:
    index = choice.get("index")
    return index if isinstance(index, int) else None


def prefill_echo_logprobs(body: bytes, streamed: bool) -> dict[int, dict[str, Any]]:
    """The completions `logprobs` of prefill's echoed choices, by choice index (streamed:
    each choice's first chunk, the one that holds the prompt)."""
    if streamed:
        objs = [event_json(e) for e in SSEBuffer().feed(body + b"\n\n")]
    else:
        try:
            objs = [_json_decode(body)]
        except msgspec.DecodeError:
            return {}
    found: dict[int, dict[str, Any]] = {}
    for choice in (c for obj in objs for c in _choices(obj)):
        index, logprobs = _index(choice), choice.get("logprobs")
        if index is not None and isinstance(logprobs, dict) and index not in found:
            found[index] = logprobs
    return found


def fill_echo_choice(choice: dict[str, Any], prefill: dict[str, Any] | None) -> bool:
    """Decode's echoed prompt tokens have null logprobs (prefill computed them): take
    prefill's, position by position, while both choices hold the same tokens."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not prefill:
        return False
    try:
        rows = zip(logprobs["tokens"], prefill["tokens"], prefill["token_logprobs"], strict=False)
        values, tops = logprobs["token_logprobs"], logprobs["top_logprobs"]
        changed = False
        for k, (token, prefill_token, value) in enumerate(rows):
            if token != prefill_token:
                break
            if values[k] is None and value is not None:
                values[k], tops[k] = value, prefill["top_logprobs"][k]
                changed = True
        return changed
    except (KeyError, IndexError, TypeError):  # not the shape our servers send: leave it
        return False


def merge_echo_response(decode_body: bytes, prefill: dict[int, dict[str, Any]]) -> bytes:
    """A non-streamed completions answer with prefill's prompt logprobs filled in."""
    if not prefill:
        return decode_body
    return _rewritten(
        decode_body,
        lambda data: any([fill_echo_choice(c, prefill.get(_index(c))) for c in _choices(data)]),
    )


class EchoStreamMerger:
    """Fills prefill's prompt logprobs into the first streamed chunk of each decode choice,
    the one that echoes the prompt."""

    def __init__(self, prefill: dict[int, dict[str, Any]]):
        self._prefill = prefill

    def process(self, event: bytes) -> bytes:
        if not self._prefill:
            return event
        obj = event_json(event)
        changed = False
        for choice in _choices(obj):
            changed |= fill_echo_choice(choice, self._prefill.pop(_index(choice), None))
        return sse_event(obj) if changed else event
