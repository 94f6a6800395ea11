"""The front end's shared state and the request helpers every route module uses.

Runs in the server's front-end process; `http_server.py` builds the state, and
`admin_api`, `native_api` and `openai_api` read it through `state_of`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdserve.serving.config import ServerConfig
from pdserve.serving.dp_controller import DPController
from pdserve.serving.generation import Generator
from pdserve.serving.hooks import FrontendHooks, RequestError
from pdserve.serving.request_parse import Limits


@dataclass
class ServerState:
    cfg: ServerConfig
    controller: DPController
    hooks: FrontendHooks
    generator: Generator
    tokenizer: Any
    model_dir: str

    @property
    def limits(self) -> Limits:
        return Limits(
            dp_size=self.cfg.server.dp_size,
            max_context_len=self.controller.max_context_len,
            vocab_size=len(self.tokenizer),
            mode=self.cfg.server.mode,
        )


STATE = web.AppKey("state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


def client_gone(request: web.Request):
    """A check for a client that hung up; covers one that left before its handler started,
    which handler cancellation alone misses."""
    return lambda: request.transport is None or request.transport.is_closing()


BODY = "pdserve.json_body"  # request key: the parsed body, for the error middleware
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


async def read_json(request: web.Request) -> Any:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # json's answer to a deeply nested body
        raise RequestError(400, "malformed JSON body: nested too deeply") from None
    request[BODY] = body
    return body
