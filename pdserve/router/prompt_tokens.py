"""Token ids of a request's prompt as the servers compute them, so that kv_aware can hash
text and chat prompts too (router process). The tokenizer is the servers' own:
`--tokenizer-path`, or the `tokenizer_path` a worker's /server_info names when that
directory is on this host; chat messages go through its chat template as on the servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pdserve.router.body import CHAT, COMPLETIONS, GENERATE
from pdserve.serving.openai_format import render_chat_prompt
from pdserve.serving.request_parse import get_field

log = logging.getLogger(__name__)


def _first_text(value: Any) -> str | None:
    """The (first) prompt when it is text; None for token ids and anything malformed."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return None


def prompt_token_ids(route: str, body: dict[str, Any], tokenizer: Any) -> list[int] | None:
    """The first prompt's token ids, computed as the server will (the same `encode` call,
    the same chat template); None when the prompt is not text or the server will refuse
    it (the server then answers the client's 400)."""
    try:
        if route == CHAT:
            return render_chat_prompt(tokenizer, body.get("messages"), body)
        if route == GENERATE:  # /generate has no add_special_tokens: always added
            text, special = _first_text(body.get("text")), True
        elif route == COMPLETIONS:  # vLLM's add_special_tokens, as the server reads it
            text = _first_text(body.get("prompt"))
            special = get_field(body, "add_special_tokens", bool, True)
        else:
            return None
        return tokenizer.encode(text, add_special_tokens=special) if text is not None else None
    except Exception:  # noqa: BLE001 - a prompt the server refuses needs no route
        return None


def _load(path: str) -> Any:
    from pdserve.serving.tokenizer_loader import load_tokenizer

    return load_tokenizer(path)  # the servers' own loader: the same tokenizer, as cheaply


class PromptTokenizer:
    """Loads the tokenizer once, in a thread (the first path offered wins, or the one
    given on the command line); until it is loaded, text prompts give no token ids."""

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.path: str | None = None  # the directory loaded (or being loaded)
        self._task: asyncio.Task | None = None

    def offer(self, path: Any) -> None:
        """Start loading `path` unless a tokenizer is loaded or loading; a path that is no
        directory here (a worker on another host) is passed over."""
        if self._task is not None or not isinstance(path, str) or not os.path.isdir(path):
            return
        self.path = path
        self._task = asyncio.create_task(self._load(path))

    async def _load(self, path: str) -> None:
        try:
            self.tokenizer = await asyncio.to_thread(_load, path)
            log.info("tokenizer for text and chat prompts loaded from %s", path)
        except Exception as exc:  # noqa: BLE001 - routing falls back to load alone
            log.warning("cannot load the tokenizer at %s: %r", path, exc)
            self.path, self._task = None, None  # another worker's path may do

    @property
    def loading(self) -> bool:
        """A load is under way (it imports transformers: a second or so of CPU)."""
        return self._task is not None and not self._task.done()

    def token_ids(self, route: str, body: dict[str, Any]) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return prompt_token_ids(route, body, self.tokenizer)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
