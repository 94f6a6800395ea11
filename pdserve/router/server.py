"""The router's HTTP server: routes, worker management, health and load loops (router
process). `serve(config)` runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from typing import Any

from aiohttp import web

from pdserve.router.body import CHAT, COMPLETIONS, GENERATE
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.http_client import HttpError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.monitor import Monitor
from pdserve.router.pairing import PairChooser
from pdserve.router.proxy import Proxy, error_response
from pdserve.router.workers import WorkerRegistry

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 512 * 1024 * 1024
# Allocations between young-generation collections (Python's default is 700).
GC_GEN0_THRESHOLD = 20_000


class Router:
    def __init__(self, config: RouterConfig, rng: random.Random | None = None):
        self.config = config
        self.registry = WorkerRegistry(config)
        self.metrics = RouterMetrics()
        self.chooser = PairChooser(config, self.registry, rng or random.Random(os.urandom(16)))
        self.proxy = Proxy(config, self.chooser, self.metrics)
        self.monitor = Monitor(config, self.registry, self.metrics)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        for route in (GENERATE, COMPLETIONS, CHAT):
            app.router.add_post(route, self._forward(route))
        app.router.add_get("/health", self.health)
        app.router.add_get("/readiness", self.readiness)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/workers", self.list_workers)
        app.router.add_post("/workers", self.add_worker)
        app.router.add_delete("/workers", self.remove_worker)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/v1/models", self._from_decode("/v1/models"))
        app.router.add_get("/model_info", self._from_decode("/model_info"))
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.monitor.start(self.proxy.client, self.config.workers)

    async def _cleanup(self, app: web.Application) -> None:
        await self.monitor.stop()
        await self.proxy.stop()

    def _forward(self, route: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.proxy.handle(request, route)

        return handler

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readiness(self, request: web.Request) -> web.Response:
        if self.registry.ready(time.monotonic()):
            return web.json_response({"status": "ready"})
        return error_response(
            503,
            "not ready: need at least one healthy prefill and one "
            "healthy decode server (or one plain worker)",
        )

    async def metrics_route(self, request: web.Request) -> web.Response:
        self.monitor.update_gauges()
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def list_workers(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        return web.json_response({"workers": [w.describe(now) for w in self.registry.all()]})

    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            spec = WorkerSpec(
                url=data["url"], role=data["role"], bootstrap_port=data.get("bootstrap_port")
            )
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(
                400, f"bad worker: {exc!r}; expected {{'url', 'role', 'bootstrap_port'}}"
            )
        if self.registry.get(spec.url) is not None:
            return error_response(409, f"worker {spec.url} is already registered")
        if self.registry.all() and (spec.role == "regular") != bool(
            self.registry.by_role("regular")
        ):
            return error_response(400, "plain workers and prefill/decode workers cannot mix")
        try:
            worker = await self.monitor.probe_new(spec)
        except Exception as exc:  # noqa: BLE001 - any probe failure is the client's answer
            return error_response(
                502, f"worker {spec.url} did not answer /health and /server_info: {exc!r}"
            )
        self.registry.add(worker)
        return web.json_response(worker.describe(time.monotonic()))

    async def remove_worker(self, request: web.Request) -> web.Response:
        url = request.query.get("url")
        if url is None and request.can_read_body:
            url = (await request.json()).get("url")
        worker = self.registry.remove(url or "")
        if worker is None:
            return error_response(404, f"no worker with url {url!r}")
        self.chooser.forget(worker.url)
        return web.json_response({"removed": worker.url})

    async def server_info(self, request: web.Request) -> web.Response:
        c = self.config
        info: dict[str, Any] = {
            "role": "router",
            "policy": c.policy,
            "prefill_policy": c.policy_for("prefill"),
            "decode_policy": c.policy_for("decode"),
            "dp_aware": c.dp_aware,
            "align_room": c.align_room,
            "workers": [
                {"url": w.url, "role": w.role, "server_info": self.monitor.info.get(w.url)}
                for w in self.registry.all()
            ],
        }
        return web.json_response(info)

    def _from_decode(self, path: str):
        async def handler(request: web.Request) -> web.Response:
            now = time.monotonic()
            workers = self.registry.available("decode", now) or self.registry.available(
                "regular", now
            )
            if not workers:
                return error_response(503, "no healthy decode server available")
            timeout_s = self.config.health_check_timeout_s
            try:
                status, body = await self.proxy.client.get(workers[0].url, path, timeout_s)
                return web.Response(body=body, status=status, content_type="application/json")
            except HttpError as exc:
                return error_response(502, f"{workers[0].url}{path} failed: {exc!r}")

        return handler


async def _serve_metrics(router: Router) -> web.AppRunner | None:
    c = router.config
    if c.prometheus_port is None:
        return None
    app = web.Application()
    app.router.add_get("/metrics", router.metrics_route)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, c.prometheus_host, c.prometheus_port).start()
    return runner


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections: with the default threshold a collection runs every
    few requests and walks every long-lived object (about a tenth of the router's CPU)."""
    gc.collect()
    gc.freeze()  # startup objects live forever: keep them out of every later collection
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM."""
    router = Router(config)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts both legs.
    runner = web.AppRunner(router.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, backlog=2048).start()
    metrics_runner = await _serve_metrics(router)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tune_gc()
    log.info("router listening on http://%s:%d", config.host, config.port)
    print(f"pdserve router ready on http://{config.host}:{config.port}", flush=True)
    await stop.wait()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await runner.cleanup()
