"""HTTP shell of the bootstrap server (docs/protocol.md section 3) over a `BootstrapRegistry`.

Runs as a second aiohttp site inside the prefill front-end process (`start_bootstrap_server`),
or alone for tests: `python -m pdserve.disagg.bootstrap_server --port P --dp-size N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from aiohttp import web

from pdserve import auth, envs, netaddr
from pdserve.config import add_arguments, check, from_args, opt
from pdserve.disagg.bootstrap_registry import (
    EPOCH_HEADER,
    MAX_ROOMS_PER_QUERY,
    BootstrapError,
    BootstrapRegistry,
    RoomFailure,
    WorkerRegistration,
    check_room,
)
from pdserve.serving.content_coding import ACCEPTED_CODINGS, UnsupportedCoding
from pdserve.serving.hooks import RequestError
from pdserve.serving.http_body import read_body
from pdserve.serving.http_log import request_logger

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 10.0  # for at most 1 MiB: only a client that stopped sending takes this long
SHUTDOWN_TIMEOUT_S = 2.0
# A connection without a whole request this long is closed (the server's --idle-timeout-s
# default): aiohttp's own default kept an idle or half-sent one, a descriptor, for an hour.
IDLE_TIMEOUT_S = 75.0
Clock = Callable[[], float]
RoomValue = int | str  # rooms arrive as JSON numbers or numeric strings


class _RoomRank(msgspec.Struct):
    """`POST /register_dp_rank`: either a rank or a failure (`error` + optional `status`
    and `origin`, the side at fault)."""

    bootstrap_room: RoomValue
    dp_rank: int | None = None
    error: str | None = None
    status: int = 500
    origin: str | None = None


class _RoomsQuery(msgspec.Struct):
    bootstrap_rooms: Annotated[list[RoomValue], msgspec.Meta(max_length=MAX_ROOMS_PER_QUERY)]


def parse_room(value: RoomValue) -> int:
    """A room from JSON: an int, or a string of decimal digits (no sign, spaces or `_`)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    return check_room(value)  # any other string is refused here


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def error_response(status: int, message: str) -> web.Response:
    return _json({"error": {"message": message}}, status=status)


async def _read_body(request: web.Request) -> bytes:
    """The body, at most 1 MiB and within BODY_TIMEOUT_S (a RequestError otherwise)."""
    return await read_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S)


async def _decode_body(request: web.Request, kind: type[Any]) -> Any:
    body = await _read_body(request)
    try:
        return msgspec.json.decode(body, type=kind)
    except RecursionError:  # msgspec's answer to deeply nested JSON
        raise BootstrapError("JSON is nested too deeply") from None


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure reaches the client as {"error": {"message": ...}} with a real status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(
            exc.status, f"{request.method} {request.path}: {exc.text or exc.reason}"
        )
    except RequestError as exc:  # a body too big, sent short, not readable or coded br/zstd
        response = error_response(exc.status, f"{request.method} {request.path}: {exc}")
        if isinstance(exc, UnsupportedCoding):
            response.headers["Accept-Encoding"] = ACCEPTED_CODINGS
        return response
    except (msgspec.DecodeError, msgspec.ValidationError, BootstrapError) as exc:
        return error_response(400, f"{request.method} {request.path}: {exc}")
    except Exception:
        logger.exception(
            "bootstrap server: unexpected error on %s %s", request.method, request.path
        )
        return error_response(500, f"{request.method} {request.path}: internal error")


WRITE_ROUTES = frozenset({("PUT", "/route"), ("POST", "/register_dp_rank")})


def secret_middleware(checker: auth.ProofChecker, now: Clock = time.time):
    """Bootstrap writes must carry a fresh proof of the disagg secret; 401 otherwise."""

    @web.middleware
    async def check_proof(request: web.Request, handler) -> web.StreamResponse:
        if (request.method, request.path) not in WRITE_ROUTES:
            return await handler(request)
        body = await _read_body(request)
        try:
            proof = auth.parse_proof_header(request.headers.get(auth.PROOF_HEADER))
        except auth.AuthError as exc:
            checker.refuse("missing or malformed proof")
            return _refused(request, exc)
        try:
            message = auth.request_message(request.method, request.path, body)
            checker.check(proof, auth.BOOTSTRAP_PURPOSE, message, now())
        except auth.AuthError as exc:
            return _refused(request, exc)
        return await handler(request)

    return check_proof


def _refused(request: web.Request, exc: auth.AuthError) -> web.Response:
    logger.warning(
        "bootstrap: refused %s %s from %s: %s", request.method, request.path, request.remote, exc
    )
    return error_response(401, f"{request.method} {request.path}: {exc}")


class _Handlers:
    def __init__(self, registry: BootstrapRegistry, now: Clock):
        self.registry = registry
        self.now = now

    async def put_route(self, request: web.Request) -> web.Response:
        reg = await _decode_body(request, WorkerRegistration)
        self.registry.register_worker(reg, self.now())
        logger.info(
            "bootstrap: registered prefill worker dp_rank=%d tp_rank=%d at %s",
            reg.dp_rank,
            reg.tp_rank,
            reg.kv_endpoint,
        )
        return _json({"ok": True})

    async def get_route(self, request: web.Request) -> web.Response:
        rank_text = request.query.get("prefill_dp_rank")
        if rank_text is None:
            info = self.registry.server_info()
            if info is None:
                reason = self.registry.not_ready_reason()
                return error_response(503, f"bootstrap server not ready: {reason}")
            return _json(info)
        if not (rank_text.isascii() and rank_text.isdigit() and len(rank_text) <= 9):
            raise BootstrapError(
                f"prefill_dp_rank must be a non-negative integer, got {rank_text!r}"
            )
        worker = self.registry.worker(int(rank_text))
        if worker is None:
            return error_response(404, f"no prefill worker registered with dp_rank {rank_text}")
        return _json(worker)

    async def register_dp_rank(self, request: web.Request) -> web.Response:
        msg = await _decode_body(request, _RoomRank)
        room = parse_room(msg.bootstrap_room)
        if (msg.dp_rank is None) == (msg.error is None):
            raise BootstrapError("give exactly one of dp_rank and error")
        if msg.error is None and msg.origin is not None:
            raise BootstrapError("origin goes with error, not with dp_rank")
        if msg.error is not None:
            self.registry.record_failure(room, msg.error, msg.status, self.now(), msg.origin)
        else:
            self.registry.register_room(room, msg.dp_rank, self.now())
        return _json({"ok": True})

    async def query_dp_ranks(self, request: web.Request) -> web.Response:
        msg = await _decode_body(request, _RoomsQuery)
        rooms = [parse_room(value) for value in msg.bootstrap_rooms]
        answer = self.registry.query(rooms, self.now())
        response = _json(
            {
                str(room): (v.to_json() if isinstance(v, RoomFailure) else v)
                for room, v in answer.items()
            }
        )
        # Which start of the prefill server answered: a decode that resolved the rooms on
        # server info of an earlier start (another --dp-size) must not wait on this answer.
        if self.registry.epoch is not None:
            response.headers[EPOCH_HEADER] = str(self.registry.epoch)
        return response

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})


async def _expire_forever(registry: BootstrapRegistry, now: Clock, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        num_dropped = registry.expire(now())
        if num_dropped:
            logger.debug("bootstrap: expired %d idle rooms", num_dropped)


def make_bootstrap_app(
    registry: BootstrapRegistry,
    *,
    now: Clock = time.monotonic,
    expire_interval_s: float | None = None,
    checker: auth.ProofChecker | None = None,
) -> web.Application:
    """The bootstrap routes over `registry`, plus a task that expires idle rooms; with a
    `checker`, writes must prove the disagg secret."""
    interval_s = (
        expire_interval_s if expire_interval_s is not None else min(1.0, registry.room_ttl_s / 2)
    )
    handlers = _Handlers(registry, now)
    middlewares = [_json_errors] if checker is None else [_json_errors, secret_middleware(checker)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.router.add_put("/route", handlers.put_route)
    app.router.add_get("/route", handlers.get_route)
    app.router.add_post("/register_dp_rank", handlers.register_dp_rank)
    app.router.add_post("/query_dp_ranks", handlers.query_dp_ranks)
    app.router.add_get("/health", handlers.health)

    async def expiry(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_expire_forever(registry, now, interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(expiry)
    return app


@dataclass
class BootstrapServer:
    """A running bootstrap site; `port` is the bound one (useful with port 0)."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return netaddr.http_url(self.host, self.port)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_bootstrap_server(
    registry: BootstrapRegistry,
    host: str,
    port: int,
    *,
    now: Clock = time.monotonic,
    expire_interval_s: float | None = None,
    checker: auth.ProofChecker | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> BootstrapServer:
    """Serve `registry` on host:port from the running event loop; port 0 picks a free one."""
    runner = web.AppRunner(
        make_bootstrap_app(registry, now=now, expire_interval_s=expire_interval_s, checker=checker),
        access_log=None,
        keepalive_timeout=idle_timeout_s,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        auto_decompress=False,  # read_body undoes the coding (a br body: a JSON 415)
        logger=request_logger(),
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return BootstrapServer(runner, host, bound_port)


@dataclass(frozen=True)
class BootstrapServerConfig:
    """Options of the standalone bootstrap server (tests, debugging)."""

    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8998, "port to bind (0: a free one, printed at start)")
    dp_size: int | None = opt(None, "expected prefill DP size (default: fixed by the first worker)")
    room_ttl_s: float = opt(envs.room_ttl_s(), "room entries expire after this idle time")
    disagg_secret: str | None = opt(
        envs.disagg_secret(),
        "writes must prove this secret (default: env PDSERVE_DISAGG_SECRET)",
        repr=False,
    )

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, f"--port out of range: {self.port}")
        check(self.dp_size is None or self.dp_size >= 1, "--dp-size must be >= 1")
        check(self.room_ttl_s > 0, "--room-ttl-s must be > 0")


async def _serve(config: BootstrapServerConfig) -> None:
    registry = BootstrapRegistry(room_ttl_s=config.room_ttl_s, dp_size=config.dp_size)
    checker = auth.ProofChecker(config.disagg_secret) if config.disagg_secret else None
    server = await start_bootstrap_server(registry, config.host, config.port, checker=checker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bootstrap server listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, BootstrapServerConfig)
    config = from_args(BootstrapServerConfig, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
