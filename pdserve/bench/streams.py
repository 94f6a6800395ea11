"""Request bodies and streamed-answer parsing for each endpoint the benchmark can target.

Pure (no I/O): runs in the `pdserve bench` client. Native `/generate` streams
`data: {...}` events with cumulative `output_ids` and `meta_info.completion_tokens`;
the OpenAI routes stream chunk deltas and, with `stream_options.include_usage`, a last
chunk holding `usage`. Both end with `data: [DONE]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdserve.bench.workload import Prompt

PATHS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}


def build_body(
    endpoint: str,
    prompt: Prompt,
    model: str | None,
    temperature: float,
    ignore_eos: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The streaming request body for `prompt`; `extra` fields are merged in last, an object
    into the bench's own object of that name (`sampling_params`, `stream_options`) so that
    adding a field keeps the output length, temperature and usage the bench relies on."""
    if endpoint == "generate":
        body: dict[str, Any] = {
            "input_ids": prompt.input_ids,
            "sampling_params": {
                "max_new_tokens": prompt.output_len,
                "temperature": temperature,
                "ignore_eos": ignore_eos,
            },
            "stream": True,
        }
    else:
        if prompt.text is None:
            raise ValueError(f"endpoint {endpoint!r} needs prompt text")
        body = {
            "max_tokens": prompt.output_len,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:  # not an OpenAI field (vLLM, SGLang and pdserve take it): only when on
            body["ignore_eos"] = True
        if model is not None:
            body["model"] = model
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
    for key, value in (extra or {}).items():
        mine = body.get(key)
        both_objects = isinstance(mine, dict) and isinstance(value, dict)
        body[key] = {**mine, **value} if both_objects else value
    return body


class LineSplitter:
    """Cuts a byte stream into lines whatever their length (cumulative native chunks grow
    with the output, past the line limits of stream readers)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        return lines

    def flush(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        return [rest] if rest else []


def sse_data(line: bytes) -> str | None:
    """The payload of one SSE `data:` line, or None for blank lines, comments and other fields."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None
    return text[len("data:") :].strip()


@dataclass
class StreamEvent:
    """What one streamed chunk told: new tokens arrived, and the server's counts so far."""

    has_new_tokens: bool = False
    completion_tokens: int | None = None  # cumulative, from the server
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the server's cache
    output_ids: list[int] | None = None  # cumulative (native), None on the OpenAI routes
    text: str | None = None  # cumulative (native) or this chunk's delta (OpenAI)
    top_logprobs: list | None = None  # cumulative `output_top_logprobs` (native)
    finished: bool = False  # the server gave a finish reason
    error: str | None = None


def _count(value: Any) -> int | None:
    """A token count as the server gave it; TypeError for anything but an int or null."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"token count {value!r} is not an integer")


def _error_message(obj: dict[str, Any]) -> str | None:
    err = obj.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


class StreamParser:
    """Reads one request's stream payloads in order and says what each brought."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._seen_tokens = 0

    def feed(self, payload: str) -> StreamEvent:
        obj = json.loads(payload)
        if not isinstance(obj, dict):
            return StreamEvent(error=f"unexpected stream item {payload[:200]!r}")
        error = _error_message(obj)
        if error is not None:
            return StreamEvent(error=error)
        try:
            if self.endpoint == "generate":
                return self._feed_native(obj)
            return self._feed_openai(obj)
        except (AttributeError, TypeError) as exc:  # a field of an unexpected type
            raise ValueError(f"unexpected stream item {payload[:200]!r} ({exc})") from None

    def _feed_native(self, obj: dict[str, Any]) -> StreamEvent:
        meta = obj.get("meta_info") or {}
        count = _count(meta.get("completion_tokens"))
        if count is None and isinstance(obj.get("output_ids"), list):
            count = len(obj["output_ids"])
        event = StreamEvent(
            completion_tokens=count,
            prompt_tokens=_count(meta.get("prompt_tokens")),
            cached_tokens=_count(meta.get("cached_tokens")),
            output_ids=obj.get("output_ids") if isinstance(obj.get("output_ids"), list) else None,
            text=obj.get("text") if isinstance(obj.get("text"), str) else None,
            top_logprobs=tops
            if isinstance(tops := meta.get("output_top_logprobs"), list)
            else None,
        )
        finish = meta.get("finish_reason")
        event.finished = finish is not None
        if isinstance(finish, dict) and finish.get("type") == "abort":
            event.error = str(finish.get("message") or "aborted by the server")
        if count is not None and count > self._seen_tokens:
            event.has_new_tokens = True
            self._seen_tokens = count
        return event

    def _feed_openai(self, obj: dict[str, Any]) -> StreamEvent:
        usage = obj.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        event = StreamEvent(
            completion_tokens=_count(usage.get("completion_tokens")),
            prompt_tokens=_count(usage.get("prompt_tokens")),
            cached_tokens=_count(details.get("cached_tokens"))
            if isinstance(details, dict)
            else None,
        )
        for choice in obj.get("choices") or []:
            text = _choice_text(choice)
            if text is not None:
                event.has_new_tokens = True
                event.text = (event.text or "") + text
            if choice.get("finish_reason") is not None:
                event.finished = True
        return event


def _choice_text(choice: dict[str, Any]) -> str | None:
    """The text of a chunk that carries a token, "" included: servers send one chunk per
    token and hold back the text of a token that ends inside a UTF-8 character. None for a
    chunk without one: the chat role chunk, or a finish chunk with an empty delta."""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    delta = choice.get("delta") or {}
    if "role" in delta:
        return delta.get("content") or None
    texts = [delta[key] for key in ("content", "reasoning_content") if isinstance(delta.get(key), str)]  # fmt: skip
    return "".join(texts) if texts else None
