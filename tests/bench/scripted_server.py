"""An OpenAI-compatible streaming server whose every answer follows a script (token texts,
delays, usage, failures), so that the benchmark's figures can be checked against known
counts. aiohttp on a real loopback socket, in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from tests.helpers import free_port


@dataclass(frozen=True)
class Script:
    """One answer: a chunk per token text, the first after `first_delay_s`, the others
    `gap_s` apart; the last carries `finish`. `usage_tokens` None sends no usage chunk."""

    tokens: tuple[str, ...] = ("a", "b", "c")
    first_delay_s: float = 0.0
    gap_s: float = 0.0
    usage_tokens: int | None = 3
    finish: str | None = "length"
    status: int = 200  # anything else answers this status with an error body
    cut_after: int | None = None  # drop the connection after this many token chunks
    error_after: int | None = None  # send an error event after this many token chunks
    done_newline: bool = True  # False: `data: [DONE]` ends the body without a newline


@dataclass
class ScriptedServer:
    """Answers `/v1/completions` by the script named by the prompt text (else `default`)."""

    scripts: dict[str, Script] = field(default_factory=dict)
    default: Script = Script()
    prompts_seen: list[str] = field(default_factory=list)
    models_listing: object = field(default_factory=lambda: {"data": [{"id": "scripted"}]})

    def script_for(self, prompt: str) -> Script:
        return self.scripts.get(prompt, self.default)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.prompts_seen.append(body["prompt"])
        script = self.script_for(body["prompt"])
        if script.status != 200:
            return web.json_response({"error": {"message": "scripted"}}, status=script.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, text in enumerate(script.tokens):
            if i == script.cut_after:
                request.transport.close()
                return resp
            if i == script.error_after:
                await _event(resp, {"error": {"message": "scripted error"}})
                return resp
            await asyncio.sleep(script.first_delay_s if i == 0 else script.gap_s)
            finish = script.finish if i == len(script.tokens) - 1 else None
            await _event(resp, {"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        if script.usage_tokens is not None:
            usage = {"prompt_tokens": 4, "completion_tokens": script.usage_tokens}
            await _event(resp, {"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]" + (b"\n\n" if script.done_newline else b""))
        return resp

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response(self.models_listing)


async def _event(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")


@contextlib.asynccontextmanager
async def serving(server: ScriptedServer) -> AsyncIterator[str]:
    """Serve `server` on a free loopback port; yields its base URL, stops it on exit."""
    app = web.Application()
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_get("/v1/models", server.models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
