"""Front-end hooks of the prefill and decode servers (docs/protocol.md sections 3 and 4).

Runs in a server's HTTP front-end process (asyncio). Prefill: hosts the bootstrap server,
applies the dispatch-time rank rules and publishes rooms. Decode: resolves which prefill
worker holds a room's KV and hands its endpoint to the decode worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from pdserve.auth import ProofChecker, is_loopback
from pdserve.disagg.bootstrap_client import bootstrap_url, post_room_failure
from pdserve.disagg.bootstrap_registry import BootstrapRegistry, ServerInfo
from pdserve.disagg.bootstrap_server import start_bootstrap_server
from pdserve.disagg.messages import PROTOCOL_VERSION
from pdserve.disagg.metrics import DisaggMetrics, failure_kind
from pdserve.disagg.peer_info import PeerDirectory, StalePrefillInfo
from pdserve.disagg.rank_resolver import (
    PrefillAction,
    PrefillServerInfo,
    RankError,
    ResolvePath,
    decide_prefill,
    registers_all_rooms,
    resolve_decode,
)
from pdserve.disagg.room_relay import LegMatcher
from pdserve.disagg.worker_side import advertised_host
from pdserve.netaddr import cannot_listen, host_port
from pdserve.serving.hooks import (
    DECODE_ORIGIN,
    PREFILL_ORIGIN,
    FrontendHooks,
    RequestCancelled,
    RequestError,
)
from pdserve.serving.pd_fields import PDFields, RoomAddress, home_rank
from pdserve.serving.protocol import GenerateReq, ReqOutput

if TYPE_CHECKING:
    from pdserve.disagg.config import PDServerConfig as ServerConfig
    from pdserve.serving.dp_controller import DPController


def make_frontend_hooks(cfg: ServerConfig, controller: DPController) -> FrontendHooks:
    metrics = DisaggMetrics(controller.metrics)
    if cfg.server.mode == "prefill":
        return PrefillFrontendHooks(cfg, controller, metrics)
    if cfg.server.mode == "decode":
        return DecodeFrontendHooks(cfg, controller, metrics)
    raise ValueError(f"no disaggregation hooks for mode {cfg.server.mode!r}")


class _PDFrontendHooks(FrontendHooks):
    metrics: DisaggMetrics

    def observe_worker_output(self, out: ReqOutput) -> None:
        """A worker's figures (KV moved, stage times), counted as they arrive: a leg whose
        client left as its KV was sent still sent it (prefill's bytes fell short of decode's)."""
        if out.kv_bytes or out.kv_transfer_s is not None:
            self.metrics.transfer(out.kv_bytes, out.kv_transfer_s, out.decode_cached_tokens)
        if out.stage_s:
            self.metrics.stages(out.stage_s)
        if out.kv_relay_s is not None:
            self.metrics.relay_seconds.observe(out.kv_relay_s)

    def on_output(self, req: GenerateReq, out: ReqOutput) -> None:
        if out.error_message:
            self.metrics.failure(failure_kind(out.error_message))


class PrefillFrontendHooks(_PDFrontendHooks):
    def __init__(self, cfg: ServerConfig, controller: DPController, metrics: DisaggMetrics):
        self.cfg = cfg
        self.controller = controller
        self.metrics = metrics
        self.method = cfg.server.resolved_lb_method
        self.force = cfg.disagg.force_query_prefill_dp_rank
        self.forward = cfg.disagg.rank_mismatch == "forward"
        self.registry = _PrefillRegistry(
            cfg.disagg.room_ttl_s, cfg.server.dp_size, self._abort_room, cfg.disagg.rank_mismatch
        )
        self.bootstrap = None
        secret = cfg.disagg.disagg_secret
        self.checker = ProofChecker(secret) if secret else None
        metrics.watch_registry(self.registry, self.checker)
        self.legs = LegMatcher(cfg.disagg.bootstrap_timeout_s)
        controller.rooms_unclaimed_listeners.append(self._on_unclaimed)
        controller.output_listeners.append(self.observe_worker_output)

    async def start(self) -> None:
        host, port = self.cfg.server.host, self.cfg.disagg.bootstrap_port
        try:
            self.bootstrap = await start_bootstrap_server(
                self.registry, host, port, checker=self.checker
            )
        except OSError as exc:  # the server's failed start names the flag, as for --port
            raise cannot_listen("--bootstrap-port", port, host_port(host, port), exc) from exc

    def exposure_warnings(self) -> list[str]:
        return _secret_warnings(self.cfg)

    async def stop(self) -> None:
        if self.bootstrap is not None:
            await self.bootstrap.stop()

    def not_ready_reason(self) -> str | None:
        """Healthy only once decode can find every worker's KV endpoint here."""
        reason = self.registry.not_ready_reason()
        return None if reason is None else f"bootstrap server not ready: {reason}"

    def server_info(self) -> dict[str, Any]:
        return {
            "bootstrap_port": self.cfg.disagg.bootstrap_port,
            "follow_bootstrap_room": self.method == "follow_bootstrap_room",
            "registers_all_rooms": registers_all_rooms(self.method, self.force),
            "force_query_prefill_dp_rank": self.force,
            "rank_mismatch": self.cfg.disagg.rank_mismatch,
            "transfer_backend": self.cfg.disagg.transfer_backend,
            "bootstrap_host": advertised_host(self.cfg),
        }

    async def prepare(self, req: GenerateReq, dp_rank: int, pd: PDFields) -> GenerateReq:
        room = req.disagg.room
        now = time.monotonic()
        failure = self.registry.failure(room)
        if failure is not None:  # its decode leg failed first and said so
            raise RequestError(failure.status, failure.error, origin=_leg_origin(failure.origin))
        try:
            action = decide_prefill(
                room,
                dp_rank,
                self.cfg.server.dp_size,
                self.method,
                self.force,
                pd.prefill_dp_rank,
                self.forward,
                moves_kv=req.sampling.max_new_tokens > 0,
            )
            if action is PrefillAction.FORWARD:
                self._forward(room, dp_rank)
            holder = self.legs.dispatched(room, dp_rank, now) if self._many() else None
            home = home_rank(room, self.cfg.server.dp_size)
            forwarded_home = action is PrefillAction.FORWARD and holder == home
            if holder is not None and not forwarded_home:  # a page list waits elsewhere
                self._legs_disagree(room, holder, dp_rank)
        except RankError as exc:
            self.metrics.conflict(str(exc))
            raise RequestError(exc.status, str(exc)) from None  # on_rejected records it
        if action is PrefillAction.REGISTER:
            self.registry.register_room(room, dp_rank, now)
        return req

    def on_rejected(
        self, rooms: list[RoomAddress], status: int, message: str, origin: str | None = None
    ) -> None:
        now = time.monotonic()
        for address in rooms:
            self.fail_room(address.room, message, status, now, _leg_origin(origin))

    def _forward(self, room: int, dp_rank: int) -> None:
        """Tell the room's home worker where the room went, before the request goes there:
        decode's page list reaches the home worker (fast path) and is redirected to us. If the
        room fails, the home worker hears it with every other worker (`_abort_room`), so a
        page list that reaches it later gets the failure, not a redirect."""
        home = home_rank(room, self.cfg.server.dp_size)
        if self.controller.down(home) is not None:
            raise RankError(
                f"cannot forward room {room} to dp_rank {dp_rank}: its home dp_rank {home}, "
                f"where decode sends the page list, is not running",
                503,
            )
        self._redirect(home, room, dp_rank)

    def _redirect(self, holder: int, room: int, dp_rank: int) -> None:
        """Worker `holder`, which gets decode's page list for `room`, passes it to `dp_rank`."""
        worker = self.registry.worker(dp_rank)
        if worker is None:
            raise RankError(f"prefill dp_rank {dp_rank} has not registered its KV endpoint", 503)
        self.controller.room_forwarded(holder, room, dp_rank, worker["kv_endpoint"])
        self.metrics.rooms_forwarded.inc()

    def _many(self) -> bool:
        return self.cfg.server.dp_size > 1

    def _on_unclaimed(self, holder: int, rooms: list[int]) -> None:
        """Worker `holder` has decode's page list for `rooms` but not their requests."""
        now = time.monotonic()
        for room in rooms:
            dp_rank = self.legs.unclaimed(room, holder, now)
            if dp_rank is None:
                continue
            try:
                self._legs_disagree(room, holder, dp_rank)
            except RankError as exc:
                self.metrics.conflict(str(exc))
                self.fail_room(room, str(exc), exc.status, now)

    def _legs_disagree(self, room: int, holder: int, dp_rank: int) -> None:
        """Decode sent room's page list to worker `holder`, the request went to `dp_rank`:
        with --rank-mismatch forward the page list is redirected there; else RankError."""
        if self.forward:
            self._redirect(holder, room, dp_rank)
            return
        raise RankError(
            f"the legs of bootstrap_room {room} name different prefill ranks: decode sent its "
            f"page list to prefill dp_rank {holder}, the request was dispatched to dp_rank "
            f"{dp_rank} (check disagg_prefill_dp_rank and routed_dp_rank on both legs)"
        )

    def fail_room(
        self, room: int, reason: str, status: int, now: float, origin: str | None = None
    ) -> None:
        """The room failed before any worker saw it: a querying decode learns it from the
        registry, and one that took the fast path from the worker it asks (`_abort_room`).
        `origin` "decode" only where decode's fault (a rank conflict is nobody's)."""
        self.registry.record_failure(room, reason, status, now, origin)

    def _abort_room(self, room: int, reason: str, status: int, origin: str | None) -> None:
        """A failure recorded for a room (here, or by its decode server): every worker fails
        our leg of it with that reason and status if it holds it or it is on its way there,
        and answers decode's page list for it with the failure."""
        leg_origin = _leg_origin(origin)
        for rank in range(self.cfg.server.dp_size):
            if rank not in self.controller.dead:
                self.controller.room_failed(rank, room, reason, status, leg_origin)

    def on_finished(self, req: GenerateReq, error: RequestError | None) -> None:
        if req.disagg is None:
            return
        if error is None:
            self.registry.drop_room(req.disagg.room)
        else:
            room, origin = req.disagg.room, _leg_origin(error.origin)
            self.registry.record_failure(
                room, error.message, error.status, time.monotonic(), origin
            )


def _leg_origin(failure_origin: str | None) -> str | None:
    """The `origin` of our leg's error for a room failed with this origin (the registry's, or
    an error's): a failure decode reported as its own is its fault; one decode said prefill
    caused (e.g. its KV wait on us timed out), or of no known cause, is ours. Always a value
    the registry takes: a failure it refused would go unrecorded."""
    return DECODE_ORIGIN if failure_origin == DECODE_ORIGIN else None


def _secret_warnings(cfg: ServerConfig) -> list[str]:
    if cfg.disagg.disagg_secret or is_loopback(cfg.server.host):
        return []
    return [
        f"{cfg.server.mode} server bound to {cfg.server.host} without --disagg-secret: anyone "
        "who reaches its bootstrap or KV ports can register workers, rooms and KV peers"
    ]


class _PrefillRegistry(BootstrapRegistry):
    """The registry, plus a callback when a room's failure is recorded, so that a decode
    server that gives up on a room (POST /register_dp_rank with an error) stops our leg too."""

    def __init__(
        self,
        room_ttl_s: float,
        dp_size: int,
        on_failure: Callable[[int, str, int, str | None], None],
        rank_mismatch: str,
    ):
        super().__init__(room_ttl_s, dp_size=dp_size)
        self._on_failure = on_failure
        self._rank_mismatch = rank_mismatch

    def server_info(self) -> dict[str, Any] | None:
        info = super().server_info()
        if info is not None:
            info["rank_mismatch"] = self._rank_mismatch
        return info

    def record_failure(
        self, room: int, reason: str, status: int, now: float, origin: str | None = None
    ) -> None:
        super().record_failure(room, reason, status, now, origin)
        self._on_failure(room, reason, status, origin)


# At stop: how long failures being told to prefill servers may still take.
NOTIFY_FLUSH_S = 2.0


class DecodeFrontendHooks(_PDFrontendHooks):
    def __init__(self, cfg: ServerConfig, controller: DPController, metrics: DisaggMetrics):
        self.cfg = cfg
        self.controller = controller
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.peers: PeerDirectory | None = None
        self._notify_tasks: set[asyncio.Task] = set()
        controller.output_listeners.append(self.observe_worker_output)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.peers = PeerDirectory(self.session, self.cfg.disagg.bootstrap_timeout_s, self.metrics)
        # A worker lost a prefill peer: that server died or restarted (on other KV ports):
        # the next request asks its bootstrap server instead of trying a dead endpoint.
        self.controller.kv_peers_lost_listeners.append(self.peers.forget_endpoints)

    async def stop(self) -> None:
        # Failures still on their way to prefill (those of the drain's end, above all): a
        # cancelled one left its prefill leg waiting for the page list until its bootstrap
        # deadline (30 s). A reachable bootstrap server answers in milliseconds.
        if self._notify_tasks:
            await asyncio.wait(list(self._notify_tasks), timeout=NOTIFY_FLUSH_S)
        for task in list(self._notify_tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()

    def exposure_warnings(self) -> list[str]:
        return _secret_warnings(self.cfg)

    def server_info(self) -> dict[str, Any]:
        return {"transfer_backend": self.cfg.disagg.transfer_backend}

    def _bootstrap_address(self, host: str | None, port: int | None) -> str:
        """The parse made sure a decode request names the host."""
        assert host is not None
        return bootstrap_url(host, self.cfg.disagg.bootstrap_port if port is None else port)

    async def prepare(self, req: GenerateReq, dp_rank: int, pd: PDFields) -> GenerateReq:
        if pd.local_prefill:  # no prefill server, no room: the worker computes the prompt
            return req
        if req.sampling.max_new_tokens == 0:
            # Nothing to generate, so no KV to find (the worker answers at once); the prefill
            # leg may have ended already, its room no longer published to query.
            return req
        url = self._bootstrap_address(pd.bootstrap_host, pd.bootstrap_port)
        try:
            return await self._resolve(req, dp_rank, pd.prefill_dp_rank, url)
        except RequestError as exc:  # on_rejected tells the prefill leg
            self.metrics.failure(failure_kind(exc.message))
            # As for a leg that fails later (on_finished): the next request asks anew, so a
            # prefill server restarted to cure this (another model, page size) is seen.
            if self.peers is not None and not isinstance(exc, RequestCancelled):
                self.peers.forget(url)
            raise

    def on_rejected(
        self, rooms: list[RoomAddress], status: int, message: str, origin: str | None = None
    ) -> None:
        error = RequestError(status, message, origin=origin)
        for address in rooms:
            if address.bootstrap_host is not None:
                url = self._bootstrap_address(address.bootstrap_host, address.bootstrap_port)
                self._tell_prefill(url, address.room, error)

    def on_output(self, req: GenerateReq, out: ReqOutput) -> None:
        """A decode leg aborted (POST /abort_request) stops the prefill leg too: before decode
        reserved its pages, prefill has no peer to hear it from, and its leg would wait for
        the page list until its deadline, counted as load (or holding pages) meanwhile."""
        super().on_output(req, out)
        aborted = out.finish_reason is not None and out.finish_reason.type == "abort"
        if aborted and req.disagg is not None and req.disagg.prefill_bootstrap:
            reason = f"aborted on decode: {out.finish_reason.message or 'aborted'}"
            self._tell_prefill(
                req.disagg.prefill_bootstrap, req.disagg.room, RequestError(499, reason)
            )

    def on_finished(self, req: GenerateReq, error: RequestError | None) -> None:
        """A decode leg that ended badly (deadline, disconnect, dead peer, a prompt too
        large for this pool) also stops the prefill leg, which would otherwise hold its
        pages until its own deadline; that leg answers with the status this one got."""
        if error is not None and req.disagg is not None and req.disagg.prefill_bootstrap:
            self._tell_prefill(req.disagg.prefill_bootstrap, req.disagg.room, error)
            if not isinstance(error, RequestCancelled) and self.peers is not None:
                self.peers.forget(req.disagg.prefill_bootstrap)

    def _tell_prefill(self, url: str, room: int, exc: RequestError) -> None:
        """Record the failure at the prefill's bootstrap server, which stops the prefill leg
        of the room instead of letting it wait for a page list. Asked again until the
        bootstrap deadline (that leg waits no longer): one try of 2 s was lost on a prefill
        server stopped that long, and the leg held its request for the whole deadline. Says
        whose fault it is: prefill's (our error's origin) or ours, which prefill's leg then
        marks `origin: decode` (it had none: a router took the fault for prefill's)."""
        assert self.session is not None
        session = self.session
        error = f"decode failed the room: {exc.message}"
        status = exc.status if 400 <= exc.status < 600 else 500
        origin = PREFILL_ORIGIN if exc.origin == PREFILL_ORIGIN else DECODE_ORIGIN
        secret = self.cfg.disagg.disagg_secret
        timeout_s = self.cfg.disagg.bootstrap_timeout_s

        async def post() -> None:
            with contextlib.suppress(Exception):
                await post_room_failure(
                    session, url, room, error, status, secret, timeout_s, origin=origin
                )

        task = asyncio.ensure_future(post())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def _resolve(
        self, req: GenerateReq, dp_rank: int, explicit: int | None, url: str
    ) -> GenerateReq:
        """What decode cached of a prefill server may predate a restart of it (with another
        --dp-size, rank rule, model or page size) that no KV connection of this server saw
        end: a refusal made on cached info, or an answer from another start of the server
        than that info's, is decided again once on info fetched anew."""
        assert self.peers is not None, "start() not called"
        started = time.monotonic()
        try:
            info = await self.peers.server_info(url)
            return await self._resolve_with(req, dp_rank, explicit, url, info)
        except _InfoRefusal as exc:
            fetched_at = self.peers.info_fetched_at(url)
            self.peers.forget(url)
            if not exc.restarted and fetched_at is not None and fetched_at >= started:
                raise exc.error from None  # fetched for this request: nothing older to blame
        info = await self.peers.server_info(url)
        try:
            return await self._resolve_with(req, dp_rank, explicit, url, info)
        except _InfoRefusal as exc:
            raise exc.error from None

    async def _resolve_with(
        self, req: GenerateReq, dp_rank: int, explicit: int | None, url: str, info: ServerInfo
    ) -> GenerateReq:
        assert self.peers is not None and req.disagg is not None
        room = req.disagg.room
        own = self.controller.ready[dp_rank].kv_layout
        mismatch = info.layout().mismatch(own) if own is not None else None
        if info.protocol_version != PROTOCOL_VERSION:  # its workers' answers would not parse
            mismatch = (
                f"protocol_version: prefill={info.protocol_version} decode={PROTOCOL_VERSION} "
                "(run the same pdserve version on both)"
            )
        if mismatch:
            raise _InfoRefusal(500, f"prefill server at {url} is incompatible: {mismatch}")
        summary = PrefillServerInfo(
            info.dp_size, info.follow_bootstrap_room, info.registers_all_rooms
        )
        try:
            path, rank = resolve_decode(room, summary, explicit)
            if path is ResolvePath.QUERY:
                rank = await self.peers.query_rank(url, room, info.epoch)
        except RankError as exc:
            raise _InfoRefusal(exc.status, str(exc)) from None
        except StalePrefillInfo as exc:
            raise _InfoRefusal(503, str(exc), restarted=True, origin=PREFILL_ORIGIN) from None
        assert rank is not None
        try:
            worker = await self.peers.worker(url, rank)
        except RequestError as exc:
            if exc.status != 502:  # unreachable or slow, not a refusal: no staler than us
                raise
            raise _InfoRefusal(exc.status, exc.message, origin=exc.origin) from None
        if worker.epoch != info.epoch:
            raise _InfoRefusal(
                503,
                f"prefill server at {url} restarted while decode resolved room {room}: its "
                f"dp_rank {rank} is of epoch {worker.epoch}, its server info of {info.epoch}",
                restarted=True,
                origin=PREFILL_ORIGIN,
            )
        self.metrics.resolved(path.value)
        disagg = msgspec.structs.replace(
            req.disagg,
            prefill_dp_rank=rank,
            prefill_endpoint=worker.kv_endpoint,
            prefill_bootstrap=url,
        )
        return msgspec.structs.replace(req, disagg=disagg)


class _InfoRefusal(Exception):
    """A decode leg refused on what decode knew of a prefill server (which may be stale):
    `error` is the answer unless fresh info decides otherwise. `restarted`: an answer came
    from another start of the server than the info, so even just-fetched info is stale."""

    def __init__(
        self, status: int, message: str, restarted: bool = False, origin: str | None = None
    ):
        super().__init__(message)
        self.error = RequestError(status, message, origin=origin)
        self.restarted = restarted
