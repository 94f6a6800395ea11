"""A scriptable stand-in for a pdserve prefill/decode server, run as a real process, for
the router's failure-path tests (a real server cannot fail on cue).

Each request's body may carry `"stub": {"<name>": {...}}` to script this worker:
`status` (answer that HTTP error, marked `origin` when given; only the first `times` such
requests since the last reset, when given), `delay_s` (answer late), `hold` (wait until POST /stub/release {"gate": ...}),
`chunks` (stream that many events), `hold_end` (hold the end of a stream's body, after its
`[DONE]` event, until that gate opens), `die_after` (drop the connection after that many
events), `error_after` (an error event after that many, then `[DONE]`), `prompt_lps` (prompt logprobs to report). POST /stub/control changes the server
itself: its health status, load, DP size (as a restart would), `info_hold` (hold /server_info
on that gate), `kv_events` (advertise KV events endpoints: true, or the endpoint), `flush_status`. Everything
received is logged for GET /stub/log (with each request's X-Request-Id header). Run: python -m tests.router.stub_worker --port P --name p1 --role prefill
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web


class Stub:
    def __init__(self, name: str, role: str, dp_size: int):
        self.name, self.role, self.dp_size = name, role, dp_size
        self.health_status = 200
        self.load_tokens = 0
        self.info_hold: str | None = None
        self.kv_events = False
        self.flush_status = 200
        self.gates: dict[str, asyncio.Event] = {}
        self.reset()

    def reset(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.aborts: list[str] = []
        # The X-Request-Id header of each body in `bodies`, of each abort in `aborts`.
        self.request_ids: list[str | None] = []
        self.abort_request_ids: list[str | None] = []
        self.disconnects = 0
        self.health_checks = 0
        self.infos_held = 0  # /server_info requests that reached the `info_hold` gate
        self.flushes = 0
        self.scripted_failures = 0
        self.health_generate_status = 200
        self.gates.clear()

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def script(self, body: dict) -> dict:
        return (body.get("stub") or {}).get(self.name) or {}

    def answer(self, body: dict, script: dict, index: int | None = None) -> dict:
        rid = body.get("rid")
        meta: dict[str, Any] = {"id": rid, "worker": self.name}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = script.get("prompt_lps", [])
        out: dict[str, Any] = {"text": f"from {self.name}", "output_ids": [1, 2], "meta_info": meta}
        if index is not None:
            out["index"] = index
        return out

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.request_ids.append(request.headers.get("X-Request-Id"))
        script = self.script(body)
        try:
            if script.get("delay_s"):
                await asyncio.sleep(script["delay_s"])
            if script.get("hold"):
                await asyncio.wait_for(self.gate(script["hold"]).wait(), 60)
            if script.get("status") and self.scripted_failures < script.get("times", 1e9):
                self.scripted_failures += 1
                error = {"message": f"{self.name} scripted failure", "code": script["status"]}
                if script.get("origin"):
                    error["origin"] = script["origin"]
                return web.json_response({"error": error}, status=script["status"])
            if body.get("stream"):
                return await self.stream(request, body, script)
            return web.json_response(self.answer(body, script))
        except asyncio.CancelledError:
            self.disconnects += 1
            raise

    async def stream(self, request: web.Request, body: dict, script: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(script.get("chunks", 2)):
            if script.get("die_after") == i:
                request.transport.close()  # an abrupt death mid-stream
                return resp
            if script.get("error_after") == i:  # the server's own error event, as pdserve's
                error = {"message": f"{self.name} failed mid-stream", "code": 500}
                await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                break
            if i and script.get("hold_after_first"):
                await asyncio.wait_for(self.gate(script["hold_after_first"]).wait(), 60)
            event = self.answer(body, script)
            event["text"] += f" {i}"
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        if script.get("hold_end"):  # the end of the body comes later than the last event
            await asyncio.wait_for(self.gate(script["hold_end"]).wait(), 60)
        return resp

    async def abort_request(self, request: web.Request) -> web.Response:
        self.aborts.append((await request.json())["rid"])
        self.abort_request_ids.append(request.headers.get("X-Request-Id"))
        return web.json_response({"num_aborted": 1})

    async def health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(status=self.health_status)

    async def server_info(self, request: web.Request) -> web.Response:
        info: dict[str, Any] = {
            "dp_size": self.dp_size,
            "disaggregation_mode": self.role,
            "model_path": "stub",
        }
        if self.kv_events:  # nothing listens there: a follower waits in vain, harmlessly
            # (a string: the endpoint to advertise, for both sockets)
            endpoint = self.kv_events if isinstance(self.kv_events, str) else "tcp://127.0.0.1:9"
            info |= {
                "kv_events_endpoint": endpoint,
                "kv_events_replay_endpoint": endpoint,
                "kv_events_hash_seed": 0,
                "page_size": 16,
            }
        if self.info_hold:
            self.infos_held += 1
            await asyncio.wait_for(self.gate(self.info_hold).wait(), 60)
        return web.json_response(info)

    async def flush_cache(self, request: web.Request) -> web.Response:
        self.flushes += 1
        if self.flush_status != 200:
            return web.json_response(
                {"error": {"message": "stub cannot flush"}}, status=self.flush_status
            )
        return web.Response(text="Cache flushed.")

    async def control(self, request: web.Request) -> web.Response:
        data = await request.json()
        if "health_status" in data:
            self.health_status = data["health_status"]
        if "health_generate_status" in data:
            self.health_generate_status = data["health_generate_status"]
        for name in ("load_tokens", "dp_size", "info_hold", "kv_events", "flush_status"):
            if name in data:
                setattr(self, name, data[name])
        if "gate" in data:
            self.gate(data["gate"]).set()
        if data.get("reset"):
            self.reset()
        return web.json_response({"ok": True})

    async def log(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "bodies": self.bodies,
                "aborts": self.aborts,
                "request_ids": self.request_ids,
                "abort_request_ids": self.abort_request_ids,
                "disconnects": self.disconnects,
                "health_checks": self.health_checks,
                "infos_held": self.infos_held,
                "flushes": self.flushes,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self.generate)
        app.router.add_post("/abort_request", self.abort_request)
        app.router.add_get("/health", self.health)
        app.router.add_get(
            "/health_generate", lambda r: web.Response(status=self.health_generate_status)
        )
        app.router.add_get("/server_info", self.server_info)
        app.router.add_post("/flush_cache", self.flush_cache)
        app.router.add_get(
            "/get_load",
            lambda r: web.json_response([{"num_tokens": self.load_tokens}] * self.dp_size),
        )
        app.router.add_get(
            "/v1/models",
            lambda r: web.json_response(
                {"object": "list", "data": [{"id": f"model-of-{self.name}"}]}
            ),
        )
        app.router.add_post("/stub/control", self.control)
        app.router.add_post("/stub/release", self.control)
        app.router.add_get("/stub/log", self.log)
        return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", default="decode")
    parser.add_argument("--dp-size", type=int, default=1)
    args = parser.parse_args()
    stub = Stub(args.name, args.role, args.dp_size)
    web.run_app(stub.app(), host="127.0.0.1", port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
