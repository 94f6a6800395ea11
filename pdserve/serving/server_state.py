"""The front end's shared state and the request helpers every route module uses.

Runs in the server's front-end process; `http_server.py` builds the state, and
`admin_api`, `native_api` and `openai_api` read it through `state_of`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from pdserve.serving.config import ServerConfig
from pdserve.serving.dp_controller import DPController
from pdserve.serving.generation import Generator
from pdserve.serving.hooks import (
    LARGE_BODY_BYTES,
    MAX_BODY_BYTES,
    SHUTTING_DOWN,
    FrontendHooks,
    RequestError,
)
from pdserve.serving.http_body import read_body
from pdserve.serving.http_request_id import GENERATION_PATHS
from pdserve.serving.request_parse import Limits

T = TypeVar("T")


@dataclass
class ServerState:
    cfg: ServerConfig
    controller: DPController
    hooks: FrontendHooks
    generator: Generator
    tokenizer: Any
    model_dir: str
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # Set on SIGTERM: new generation requests are refused (after their body is read, so
    # the other leg of each room they name learns of it) and /health answers 503.
    draining: bool = False

    @property
    def limits(self) -> Limits:
        return Limits(
            dp_size=self.cfg.server.dp_size,
            max_context_len=self.controller.max_context_len,
            vocab_size=self.controller.vocab_size,
            mode=self.cfg.server.mode,
            # Prefill holds a prompt's pages only: the answer's limit is decode's pool.
            max_request_tokens=None
            if self.cfg.server.mode == "prefill"
            else self.controller.pool_tokens,
            sampling_defaults=self.sampling_defaults,
        )


STATE = web.AppKey("state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


def client_gone(request: web.Request):
    """A check for a client that hung up; covers one that left before its handler started,
    which handler cancellation alone misses."""
    return lambda: request.transport is None or request.transport.is_closing()


BODY = "pdserve.json_body"  # request key: the parsed body, for the error middleware
BODY_NBYTES = "pdserve.body_nbytes"  # request key: the body's size in bytes


async def read_json(request: web.Request) -> Any:
    """The body as JSON, or a RequestError: a 413 for a declared size over the limit (before
    waiting for it), a 408 for a body not complete by the request deadline, a 400 for
    anything that is not strict JSON text (NaN, Infinity, a lone surrogate, a 5000-digit
    integer included)."""
    raw = await _read_body(request)
    request[BODY_NBYTES] = len(raw)
    body = await off_loop(request, _strict_json, raw)
    request[BODY] = body
    if state_of(request).draining and request.path in GENERATION_PATHS:
        raise RequestError(503, SHUTTING_DOWN)
    return body


async def off_loop(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, a parse or tokenization of the request's body, in a worker thread when
    the body is large: encoding megabytes of text takes seconds (12 MB: 15 s), during which
    the event loop answered no one, /health included, so the router took the server out
    and every stream stalled. HF fast tokenizers release the GIL while they encode."""
    if request.get(BODY_NBYTES, 0) < LARGE_BODY_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _read_body(request: web.Request) -> bytes:
    return await read_body(request, MAX_BODY_BYTES, state_of(request).cfg.server.request_timeout_s)


def _strict_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
        if LONE_SURROGATE.search(raw) and _has_lone_surrogate(body):
            raise ValueError("a string holds a lone UTF-16 surrogate, which is not text")
    except RecursionError:  # json's answer to a deeply nested body
        raise RequestError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    return body


LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a surrogate escape: maybe one of a pair


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one past a double's range (1e400) is refused, not read as
    inf: it passed the checks NaN and Infinity meet (temperature 1e400 was served), and
    the router's parser refuses it too, so both paths answer alike."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False
