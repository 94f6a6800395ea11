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

from pdserve import netaddr
from pdserve.auth import bearer_ok, is_loopback
from pdserve.cors import allowed_origin
from pdserve.router.body import CHAT, COMPLETIONS, GENERATE, BadRequest
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.content_coding import ACCEPT_ENCODING, UnsupportedCoding, decoded_body
from pdserve.router.fanout import flush_cache, get_load, health_generate
from pdserve.router.http_client import HttpError
from pdserve.router.http_parse import Headers, find_header
from pdserve.router.http_server import (
    Handler,
    HeadGuard,
    HttpServer,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from pdserve.router.kv_follow import KVFollower
from pdserve.router.metrics import RouterMetrics
from pdserve.router.monitor import Monitor, RoleMismatch
from pdserve.router.pairing import PairChooser
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.proxy import Proxy, error_response
from pdserve.router.workers import WorkerRegistry, stuck_reasons
from pdserve.serving.hooks import error_object

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 512 * 1024 * 1024
# Allocations between young-generation collections (Python's default is 700).
GC_GEN0_THRESHOLD = 20_000
OPEN_PATHS = frozenset({"/health"})


class Router:
    def __init__(self, config: RouterConfig, rng: random.Random | None = None):
        self.config = config
        self.registry = WorkerRegistry(config)
        self.metrics = RouterMetrics()
        self.chooser = PairChooser(config, self.registry, rng or random.Random(os.urandom(16)))
        follows = self.chooser.follows_kv_events
        # kv_aware hashes token ids: text and chat prompts need the servers' tokenizer.
        self.prompt_tokenizer = PromptTokenizer() if follows else None
        self.proxy = Proxy(config, self.chooser, self.metrics, self.prompt_tokenizer)
        follower = KVFollower(self.chooser.kv_index) if follows else None
        self.monitor = Monitor(config, self.registry, self.metrics, follower, self.prompt_tokenizer)

    def routes(self) -> dict[str, dict[str, Handler]]:
        """path -> method -> handler."""
        routes: dict[str, dict[str, Handler]] = {
            route: {"POST": self._forward(route)} for route in (GENERATE, COMPLETIONS, CHAT)
        }
        routes |= {
            "/health": {"GET": self.health},
            "/health_generate": {"GET": self.health_generate},
            "/get_load": {"GET": self.get_load},
            "/get_loads": {"GET": self.get_load},  # sglang-router's name
            "/flush_cache": {"POST": self.flush_cache},
            "/readiness": {"GET": self.readiness},
            "/metrics": {"GET": self.metrics_route},
            "/workers": {
                "GET": self.list_workers,
                "POST": self.add_worker,
                "DELETE": self.remove_worker,
            },
            "/server_info": {"GET": self.server_info},
            "/get_server_info": {"GET": self.server_info},
            "/v1/models": {"GET": self._from_decode()},
            "/v1/models/*": {"GET": self._from_decode()},  # retrieve one model
            "/model_info": {"GET": self._from_decode()},
            "/tokenize": {"POST": self._from_decode()},
            "/detokenize": {"POST": self._from_decode()},
        }
        return self._guarded(routes)

    def _guarded(self, routes: dict[str, dict[str, Handler]]) -> dict[str, dict[str, Handler]]:
        """With --api-key: every route but /health answers 401 without the Bearer key."""
        key = self.config.api_key
        if not key:
            return routes
        return {
            path: (
                methods
                if path in OPEN_PATHS
                else {method: self._with_key(handler, key) for method, handler in methods.items()}
            )
            for path, methods in routes.items()
        }

    def _with_key(self, handler: Handler, key: str) -> Handler:
        async def guarded(request: Request) -> Response | StreamResponse:
            if bearer_ok(request.header("Authorization"), key):
                return await handler(request)
            return self._refusal()

        return guarded

    def head_guard(self) -> HeadGuard | None:
        """With --api-key: the key checked on each request's head, before its body is read
        (the handlers check it again). A client without it made the router read and hold a
        body of up to MAX_BODY_BYTES per connection before its 401, and got 100 Continue."""
        key = self.config.api_key
        if not key:
            return None

        def allows(target: str, headers: Headers) -> bool:
            if target.partition("?")[0] in OPEN_PATHS:
                return True
            if self._cors_preflight(headers):  # a browser sends no key with a preflight
                return True
            value = find_header(headers, b"authorization")
            return bearer_ok(None if value is None else value.decode("latin-1"), key)

        return HeadGuard(allows, self._refusal)

    def _cors_preflight(self, headers: Headers) -> bool:
        """A head that may be a browser's preflight from an allowed origin (its method is
        not known here): the server answers it before routing; any other request with
        such headers still meets the key check of its route's handler."""
        origin = find_header(headers, b"origin")
        method = find_header(headers, b"access-control-request-method")
        return (
            origin is not None
            and method is not None
            and allowed_origin(origin.decode("latin-1"), self.config.allowed_origins) is not None
        )

    def _refusal(self) -> Response:
        self.metrics.auth_refusals.inc()
        # The servers' answer, type and challenge included (clients tell a key problem by
        # the type; RFC 9110 11.6.1: a 401 names the scheme it wants).
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        error = error_object(401, message, "authentication_error")
        return json_response({"error": error}, 401, {"WWW-Authenticate": "Bearer"})

    def start(self) -> None:
        if self.prompt_tokenizer is not None:
            self.prompt_tokenizer.offer(self.config.tokenizer_path)
        self.monitor.start(self.proxy.client, self.config.workers)

    async def stop(self) -> None:
        await self.monitor.stop()
        if self.prompt_tokenizer is not None:
            await self.prompt_tokenizer.stop()
        await self.proxy.stop()

    def _forward(self, route: str) -> Handler:
        async def handler(request: Request) -> Response | StreamResponse:
            return await self.proxy.handle(request, route)

        return handler

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def health_generate(self, request: Request) -> Response:
        """One available prefill + decode pair (or plain worker) generates a token each."""
        now = time.monotonic()
        if self.registry.by_role("regular"):
            pair = self.registry.available("regular", now)[:1]
        else:
            prefills = self.registry.available("prefill", now)
            decodes = self.registry.available("decode", now)
            pair = prefills[:1] + decodes[:1] if prefills and decodes else []
        if not pair:
            return error_response(503, "no healthy worker pair to run health_generate on")
        timeout_s = self.config.health_generate_timeout_s
        return await health_generate(self.proxy.client, pair, timeout_s)

    async def get_load(self, request: Request) -> Response:
        timeout_s = self.config.health_check_timeout_s
        return await get_load(self.proxy.client, self.registry.all(), timeout_s)

    async def flush_cache(self, request: Request) -> Response:
        timeout_s = self.config.flush_cache_timeout_s
        return await flush_cache(self.proxy.client, self.registry.all(), timeout_s)

    async def readiness(self, request: Request) -> Response:
        if self.prompt_tokenizer is not None and self.prompt_tokenizer.loading:
            # Not ready while the import competes with the first requests for the CPU.
            return error_response(503, "not ready: loading the servers' tokenizer")
        if self.registry.ready(time.monotonic()):
            return json_response({"status": "ready"})
        out = [w for w in self.registry.all() if not w.health.healthy]
        return error_response(
            503,
            "not ready: need at least one healthy prefill and one "
            f"healthy decode server (or one plain worker){stuck_reasons(out)}",
        )

    async def metrics_route(self, request: Request) -> Response:
        self.monitor.update_gauges()
        return Response(self.metrics.render(), content_type="text/plain; version=0.0.4")

    async def list_workers(self, request: Request) -> Response:
        now = time.monotonic()
        return json_response({"workers": [w.describe(now) for w in self.registry.all()]})

    async def add_worker(self, request: Request) -> Response:
        try:
            data = request.json()
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
            worker, info = await self.monitor.probe_new(spec)
        except RoleMismatch as exc:
            self._drop_unregistered(spec.url)
            return error_response(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - any probe failure is the client's answer
            self._drop_unregistered(spec.url)
            return error_response(
                502, f"worker {spec.url} did not answer /health and /server_info: {exc!r}"
            )
        if self.registry.get(spec.url) is not None:  # added by another call meanwhile
            return error_response(409, f"worker {spec.url} is already registered")
        self.registry.add(worker)
        await self.monitor.learn(worker, info)
        return json_response(worker.describe(time.monotonic()))

    def _drop_unregistered(self, url: str) -> None:
        """A refused POST /workers leaves no connection pool behind: the probe's keep-alive
        connection stayed open (until the server's idle timeout, or for good to a server
        with none) and its pool was kept for good, one per URL refused."""
        if self.registry.get(url) is None:
            self.proxy.client.drop(url)

    async def remove_worker(self, request: Request) -> Response:
        url = request.query.get("url")
        if url is None and request.body:
            try:
                data = request.json()
            except ValueError as exc:
                return error_response(400, f"bad body: {exc}; expected {{'url'}}")
            url = data.get("url") if isinstance(data, dict) else None
        if url is not None and not isinstance(url, str):
            return error_response(400, f"url must be a string, got {url!r}")
        worker = self.registry.remove(url or "")
        if worker is None:
            return error_response(404, f"no worker with url {url!r}")
        self.chooser.forget(worker.url)
        await self.monitor.forget(worker.url)
        self.proxy.client.drop(worker.url)
        return json_response({"removed": worker.url})

    async def server_info(self, request: Request) -> Response:
        c = self.config
        info: dict[str, Any] = {
            "role": "router",
            "policy": c.policy,
            "prefill_policy": c.policy_for("prefill"),
            "decode_policy": c.policy_for("decode"),
            "dp_aware": c.dp_aware,
            "align_room": c.align_room,
            "local_prefill_threshold": c.local_prefill_threshold,
            "workers": [
                {"url": w.url, "role": w.role, "server_info": self.monitor.info.get(w.url)}
                for w in self.registry.all()
            ],
        }
        if self.chooser.follows_kv_events:
            info["kv_index"] = self.chooser.kv_index.describe()
        if self.prompt_tokenizer is not None:  # None until loaded: text is routed by load
            loaded = self.prompt_tokenizer.tokenizer is not None
            info["prompt_tokenizer_path"] = self.prompt_tokenizer.path if loaded else None
        return json_response(info)

    def _from_decode(self) -> Handler:
        """A route a healthy decode (or plain) worker answers for the router: the request,
        its path and body as sent (the body's content coding undone, as for generation),
        and the worker's answer, status included, relayed."""

        async def handler(request: Request) -> Response:
            now = time.monotonic()
            workers = self.registry.available("decode", now) or self.registry.available(
                "regular", now
            )
            if not workers:
                return error_response(503, "no healthy decode server available")
            body = None
            if request.method == "POST":
                try:
                    body = decoded_body(request.body, request.header("Content-Encoding"))
                except UnsupportedCoding as exc:
                    return error_response(exc.status, exc.message, headers=ACCEPT_ENCODING)
                except BadRequest as exc:
                    return error_response(exc.status, f"bad request: {exc}")
            return await self._relay(workers[0].url, request, body)

        return handler

    async def _relay(self, url: str, request: Request, body: bytes | None) -> Response:
        # a GET asks for a small answer; a POST (tokenize) may carry a large prompt
        timeout_s = (
            self.config.health_check_timeout_s if body is None else self.config.request_timeout_s
        )
        try:
            method = "GET" if body is None else "POST"  # HEAD too: the router drops the body
            answer = await self.proxy.client.request(method, url, request.path, timeout_s, body)
            try:
                return Response(await answer.read(), answer.status)
            finally:
                answer.release()
        except HttpError as exc:
            return error_response(502, f"{url}{request.path} failed: {exc!r}")


async def _serve_metrics(router: Router) -> HttpServer | None:
    c = router.config
    if c.prometheus_port is None:
        return None
    routes = router._guarded({"/metrics": {"GET": router.metrics_route}})
    server = HttpServer(routes, max_body_bytes=0, guard=router.head_guard())
    await _listen(server, "--prometheus-port", c.prometheus_host, c.prometheus_port)
    return server


async def _listen(server: HttpServer, flag: str, host: str, port: int) -> None:
    """OSError naming the flag where `port` cannot be bound: the failed start said only
    "error while attempting to bind on address", as if of either of the router's ports."""
    try:
        await server.start(host, port, backlog=2048)
    except OSError as exc:
        raise netaddr.cannot_listen(flag, port, netaddr.host_port(host, port), exc) from exc


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections: with the default threshold a collection runs every
    few requests and walks every long-lived object (about a tenth of the router's CPU)."""
    gc.collect()
    gc.freeze()  # startup objects live forever: keep them out of every later collection
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM."""
    router = Router(config)
    server = HttpServer(
        router.routes(),
        MAX_BODY_BYTES,
        guard=router.head_guard(),
        cors_origins=config.allowed_origins,
    )
    await _listen(server, "--port", config.host, config.port)
    router.start()
    metrics_server = await _serve_metrics(router)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tune_gc()
    log.info("router listening on %s", netaddr.http_url(config.host, config.port))
    if not config.api_key and not is_loopback(config.host):
        log.warning(
            "WARNING: router bound to %s without --api-key: anyone who reaches port %d can "
            "use it and, through it, every worker",
            config.host,
            config.port,
        )
    print(f"pdserve router ready on {netaddr.http_url(config.host, config.port)}", flush=True)
    await stop.wait()
    stop.clear()  # from here, a second signal ends the drain
    if metrics_server is not None:
        await metrics_server.stop(0.0)
    busy = sum(1 for conn in server.connections if conn.task is not None)
    log.info(
        "shutting down: %d requests in flight may run for %g s (a second SIGTERM or SIGINT "
        "ends them now)",
        busy,
        config.shutdown_timeout_s,
    )
    await server.stop(config.shutdown_timeout_s, stop)
    await router.stop()
