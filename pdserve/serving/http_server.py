"""The server's HTTP front end: lifecycle, error handling, the hooks it runs, its routes.

Runs in the front-end process (aiohttp on asyncio, uvloop when installed). Generation routes
live in `native_api.py` and `openai_api.py`; workers are reached through `DPController`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from pdserve.auth import bearer_ok, is_loopback
from pdserve.engine.request import InvalidSampling, SamplingParams
from pdserve.netaddr import cannot_listen, host_port, http_url
from pdserve.serving import admin_api, native_api, openai_api, tokenize_api
from pdserve.serving.config import ServerConfig
from pdserve.serving.content_coding import ACCEPTED_CODINGS, UnsupportedCoding
from pdserve.serving.dp_controller import DPController, WorkerStartError
from pdserve.serving.generation import Generator
from pdserve.serving.hooks import (
    SHUTTING_DOWN,
    FrontendHooks,
    RequestError,
    WorkerHooksFactory,
    colocated_worker_hooks,
    error_object,
)
from pdserve.serving.http_cors import cors_middleware, cors_on_prepare
from pdserve.serving.http_log import request_logger
from pdserve.serving.http_request_id import GENERATION_PATHS, echo_request_id, log_tag
from pdserve.serving.http_send import SEND_TIMEOUT_S, send_deadline_middleware
from pdserve.serving.metrics import ServerMetrics
from pdserve.serving.pd_fields import rooms_in_body
from pdserve.serving.server_state import (
    BODY,
    MAX_BODY_BYTES,
    STATE,
    ServerState,
)

logger = logging.getLogger("pdserve.serving")
T = TypeVar("T")
DRAIN_POLL_S = 0.05
HANDLER_GRACE_S = 5.0


def error_response(
    status: int, message: str, kind: str | None = None, param: str | None = None
) -> web.Response:
    return web.json_response({"error": error_object(status, message, kind, param)}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        _report_rejection(request, exc.status, exc.message, exc.origin)
        response = web.json_response({"error": exc.to_json()}, status=exc.status)
        if isinstance(exc, UnsupportedCoding):
            response.headers["Accept-Encoding"] = ACCEPTED_CODINGS
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        _report_rejection(request, exc.status, exc.reason)
        return error_response(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        logger.exception(
            "unhandled error on %s %s%s", request.method, request.path, log_tag(request)
        )
        _report_rejection(request, 500, f"internal error: {exc!r}")
        return error_response(500, f"internal error: {exc!r}")


def _report_rejection(
    request: web.Request, status: int, message: str, origin: str | None = None
) -> None:
    """A generation request answered with an error: the other leg of each room it names
    must fail too, instead of waiting for a transfer that will never start. Rooms still in
    flight here (a duplicate room's owner, a cancelled batch item) are its own business."""
    body = request.get(BODY)
    if body is None or request.path not in GENERATION_PATHS:
        return
    state = request.app[STATE]
    in_flight = state.generator.rooms_in_flight
    rooms = [r for r in rooms_in_body(body) if r.room not in in_flight]
    if rooms:
        try:
            state.hooks.on_rejected(rooms, status, message, origin)
        except Exception:  # best effort: the client still gets its answer
            logger.exception(
                "reporting the rejection of rooms %s failed%s", rooms, log_tag(request)
            )


OPEN_PATHS = frozenset({"/health"})


def api_key_middleware(api_key: str):
    """401 on every route but /health without `Authorization: Bearer <api_key>`."""

    @web.middleware
    async def check_api_key(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or bearer_ok(request.headers.get("Authorization"), api_key):
            return await handler(request)
        state: ServerState = request.app[STATE]
        state.controller.metrics.auth_refusals.labels("api_key").inc()
        response = error_response(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return check_api_key


FrontendHooksFactory = Callable[[ServerConfig, DPController], FrontendHooks]


def colocated_frontend_hooks(cfg: ServerConfig, controller: DPController) -> FrontendHooks:
    return FrontendHooks()


@dataclass(frozen=True)
class ServerHooks:
    """How a server's mode plugs in, chosen where the server is composed: the front end's
    hooks, and the factory each worker process calls for its own (colocated by default)."""

    frontend: FrontendHooksFactory = colocated_frontend_hooks
    worker: WorkerHooksFactory = colocated_worker_hooks


def build_app(state: ServerState) -> web.Application:
    middlewares = [send_deadline_middleware, error_middleware]
    if state.cfg.server.api_key:
        middlewares.insert(1, api_key_middleware(state.cfg.server.api_key))
    origins = state.cfg.server.allowed_origins
    if origins:  # a preflight carries no API key: answered before that is checked
        middlewares.insert(0, cors_middleware(origins))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.on_response_prepare.append(echo_request_id)
    if origins:
        app.on_response_prepare.append(cors_on_prepare(origins))
    app[SEND_TIMEOUT_S] = state.cfg.server.send_timeout_s
    admin_api.add_routes(app)
    native_api.add_routes(app)
    openai_api.add_routes(app)
    tokenize_api.add_routes(app)
    return app


async def _start_workers(
    cfg: ServerConfig, make_worker_hooks: WorkerHooksFactory
) -> tuple[ServerConfig, DPController, Any, str]:
    """(`cfg` with --dtype auto resolved, the started workers, the tokenizer, model dir)."""
    from pdserve.engine.model_dir import resolve_model_dir
    from pdserve.serving.tokenizer_loader import load_tokenizer

    # Resolve (and convert, the first time) before spawning, so workers never race on it.
    model_dir = await asyncio.to_thread(resolve_model_dir, cfg.engine.model_path)
    cfg = dataclasses.replace(cfg, engine=cfg.engine.with_dtype(model_dir))
    controller = DPController(
        cfg, ServerMetrics(cfg.server.mode, cfg.served_model_name), make_worker_hooks
    )
    tokenizer_task = asyncio.create_task(asyncio.to_thread(load_tokenizer, model_dir))
    try:
        await controller.start(cfg.server.worker_start_timeout_s)
        tokenizer = await tokenizer_task
    except BaseException:
        await asyncio.gather(tokenizer_task, return_exceptions=True)
        await controller.stop()
        raise
    return cfg, controller, tokenizer, model_dir


def _sampling_defaults(source: str, model_dir: str) -> dict[str, Any]:
    """--sampling-defaults `source`: the fields requests that omit them take."""
    from pdserve.engine.model_dir import sampling_defaults

    if source != "model":
        return {}
    defaults = {}
    for name, value in sampling_defaults(model_dir).items():
        try:  # one a request could not take would fail every request that omits it
            msgspec.convert({name: value}, SamplingParams).validate()
            defaults[name] = value
        except (msgspec.ValidationError, InvalidSampling) as exc:
            logger.warning("ignoring %s=%r of generation_config.json: %s", name, value, exc)
    if defaults:
        logger.info(
            "requests that omit them take these sampling fields of the model's "
            "generation_config.json (--sampling-defaults openai turns this off): %s",
            defaults,
        )
    return defaults


async def serve_async(cfg: ServerConfig, plug: ServerHooks) -> int:
    stop = _stop_on_signals()
    try:
        started = await _until_stopped(_start_workers(cfg, plug.worker), stop)
    except (WorkerStartError, ValueError, OSError) as exc:
        logger.error("server failed to start: %s", exc)
        return 1
    if started is None:
        logger.info("stopped while starting")
        return 0
    cfg, controller, tokenizer, model_dir = started
    hooks = plug.frontend(cfg, controller)
    generator = Generator(
        controller, hooks, tokenizer, cfg.server.mode, cfg.server.request_timeout_s
    )
    state = ServerState(
        cfg,
        controller,
        hooks,
        generator,
        tokenizer,
        model_dir,
        _sampling_defaults(cfg.server.sampling_defaults, model_dir),
    )
    # auto_decompress off: read_body undoes the coding, and answers br or zstd with a JSON
    # 415 (aiohttp's parser refused them with a plain-text 400 before any handler ran).
    # shutdown_timeout: what aiohttp gives handlers still running after `_drain` (a request
    # no worker holds yet, such as a PD leg waiting for its peer) before it cancels them.
    # keepalive_timeout: aiohttp's own default kept a connection without a whole request
    # (idle, or a head sent a byte at a time) for an hour, each one a file descriptor.
    runner = web.AppRunner(
        build_app(state),
        handler_cancellation=True,
        keepalive_timeout=cfg.server.idle_timeout_s,
        access_log=None,
        auto_decompress=False,
        shutdown_timeout=HANDLER_GRACE_S,
        logger=request_logger(),
    )
    try:
        await hooks.start()
        await runner.setup()
        await _listen(runner, cfg.server.host, cfg.server.port)
        logger.info(
            "pdserve %s server on %s (dp_size=%d, model %s)",
            cfg.server.mode,
            http_url(cfg.server.host, cfg.server.port),
            cfg.server.dp_size,
            model_dir,
        )
        warn_if_exposed(cfg, hooks)
        await stop.wait()
        await _drain(runner, controller, stop, cfg.server.shutdown_timeout_s)
    except OSError as exc:  # e.g. the port or the bootstrap port is taken
        logger.error("server failed to start: %s", exc)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await hooks.stop()
        await controller.stop()
    return 0


async def _listen(runner: web.AppRunner, host: str, port: int) -> None:
    """OSError naming the flag where `port` cannot be bound (taken, say): the failed start
    said only "error while attempting to bind on address", as if of any of its ports."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise cannot_listen("--port", port, host_port(host, port), exc) from exc


async def _drain(
    runner: web.AppRunner, controller: DPController, stop: asyncio.Event, timeout_s: float
) -> None:
    """Take no new request and let those in flight run for `timeout_s` or until a second
    signal, then fail the rest with a 503. aiohttp alone waited for them twice its 60 s
    shutdown timeout, deaf to a second signal, then dropped their connections unanswered.
    The port stays open meanwhile: a new generation request is answered 503 once its body
    is read, so the other leg of each room it names fails at once. With the port closed,
    a router that waits for both legs (SGLang's) held each prefill leg sent with this decode
    server until prefill's bootstrap deadline (30 s) before it retried elsewhere."""
    logger.info(
        "shutting down: %d requests in flight may run for %g s (a second SIGTERM or SIGINT "
        "fails them now)",
        len(controller.inflight) + runner.app[STATE].generator.num_preparing,
        timeout_s,
    )
    state = runner.app[STATE]
    state.draining = True
    stop.clear()
    deadline = time.monotonic() + timeout_s
    busy = lambda: controller.inflight or state.generator.num_preparing  # noqa: E731
    while busy() and not stop.is_set() and time.monotonic() < deadline:
        # asyncio's TimeoutError: before Python 3.11 not the builtin one, which let the
        # first poll's timeout end the drain (and the server, in a traceback)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), DRAIN_POLL_S)  # a check, not a synchronisation
    state.generator.stop()
    failed = controller.fail_all(503, SHUTTING_DOWN)
    if failed:
        logger.warning("failed %d requests still in flight: the server is shutting down", failed)


def warn_if_exposed(cfg: ServerConfig, hooks: FrontendHooks) -> None:
    """Loud at start: a routable address with nothing guarding it."""
    if is_loopback(cfg.server.host):
        return
    if not cfg.server.api_key:
        logger.warning(
            "WARNING: HTTP bound to %s without --api-key: anyone who reaches port %d can use "
            "this server",
            cfg.server.host,
            cfg.server.port,
        )
    for line in hooks.exposure_warnings():
        logger.warning("WARNING: %s", line)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, from the start: one that came while the workers
    started killed the front end with its default action (its socket directory left, its
    fork server orphaned) or ended it in a KeyboardInterrupt traceback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None once `stop` is set first (`work` cancelled: it cleans up)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def serve(cfg: ServerConfig, plug: ServerHooks | None = None) -> int:
    """Runs the server until SIGTERM or SIGINT; `plug` defaults to colocated hooks."""
    plug = plug or ServerHooks()
    logging.basicConfig(
        level=cfg.server.log_level.upper(),
        format=f"%(asctime)s [{cfg.server.mode} pid={os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve_async(cfg, plug))
    return uvloop.run(serve_async(cfg, plug))
