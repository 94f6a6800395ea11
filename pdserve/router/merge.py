"""Reading worker answers (router process; pure): error messages, server-sent events, and
putting prefill's prompt logprobs in front of decode's (native /generate only)."""

from __future__ import annotations

from typing import Any

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


def error_details(body: bytes) -> tuple[str | None, str | None]:
    """(`type`, `param`) of a worker's OpenAI-shaped error body; None where it has none."""
    try:
        data = _json_decode(body)
    except msgspec.DecodeError:
        return None, None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return None, None
    kind, param = err.get("type"), err.get("param")
    return (kind if isinstance(kind, str) else None), (param if isinstance(param, str) else None)


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
    try:
        data = _json_decode(decode_body)
    except msgspec.DecodeError:
        return decode_body
    items = data if isinstance(data, list) else [data]
    changed = [merge_item(item, fields.get(i)) for i, item in enumerate(items)]
    return _json_encode(data) if any(changed) else decode_body


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
