"""The DP controller: the front end's link to its workers (ZeroMQ) and its in-flight table.

Runs in the front-end process (asyncio). Picks a worker per request through `LoadBalancePolicy`,
sends messages, routes each `ReqOutput` to its request's queue, tracks loads and worker
deaths, and fails the in-flight requests of a dead worker with a 500, and of one that stopped
beating (`WorkerAlive`) or whose loop stopped turning (`ProgressWatch`) with a 503, instead
of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine.page_hash import hash_seed
from pdserve.engine.request import FinishReason
from pdserve.serving import protocol
from pdserve.serving.config import ServerConfig
from pdserve.serving.hooks import RequestError, WorkerHooksFactory
from pdserve.serving.ipc_dir import IpcDir
from pdserve.serving.kv_publisher import KVEventPublisher
from pdserve.serving.launcher import WorkerProcesses, WorkerStartError
from pdserve.serving.lb_policy import LoadBalancePolicy, RankLoad
from pdserve.serving.metrics import ServerMetrics
from pdserve.serving.protocol import (
    AbortReq,
    CacheDump,
    DumpCache,
    FlushCache,
    GenerateReq,
    KVCacheEvents,
    KVPeersLost,
    ReqOutput,
    ReqOutputs,
    RoomFailed,
    RoomForwarded,
    RoomsUnclaimed,
    WorkerAlive,
    WorkerFailed,
    WorkerLoad,
    WorkerReady,
)
from pdserve.serving.watchdog import ProgressWatch
from pdserve.serving.worker import STACKS_SIGNAL

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.2


@dataclass
class InFlight:
    req: GenerateReq
    dp_rank: int
    num_tokens: int
    outputs: asyncio.Queue[ReqOutput] = field(default_factory=asyncio.Queue)


def _decode_or_drop(frame: bytes) -> protocol.FromWorker | None:
    """A frame from the workers (outputs or beats), or None (logged) where it is no worker
    message: one foreign frame failed the start, or ended the loop that reads the socket
    (every request hung, or every worker was later taken for unresponsive). The sockets are
    private to this user (`_bind`), but a loopback port, where a path is too long, is not."""
    try:
        return protocol.decode_from_worker(frame)
    except msgspec.DecodeError as exc:  # a ValidationError too
        logger.warning("dropped a frame from no worker on a workers' port: %s", exc)
        return None


class DPController:
    def __init__(
        self, cfg: ServerConfig, metrics: ServerMetrics, make_worker_hooks: WorkerHooksFactory
    ):
        self.cfg = cfg
        self.dp_size = cfg.server.dp_size
        self.metrics = metrics
        self.policy = LoadBalancePolicy(cfg.server.resolved_lb_method, self.dp_size)
        self.ctx = zmq.asyncio.Context()
        # The links to the workers are Unix sockets in a directory only this user can enter
        # (mkdtemp: mode 0700): a loopback port is open to every local process, and a ZeroMQ
        # peer of an earlier server whose port this one reused reconnects to it by itself.
        # Stale directories of servers killed with SIGKILL are removed here (`IpcDir`).
        self._ipc_dir = IpcDir()
        self._out = self.ctx.socket(zmq.PULL)
        out_addr = self._bind(self._out, "out")
        self._beats = self.ctx.socket(zmq.PULL)  # WorkerAlive apart: never behind outputs
        beat_addr = self._bind(self._beats, "beats")
        self._ctrl = [self.ctx.socket(zmq.PUSH) for _ in range(self.dp_size)]
        ctrl_addrs = [self._bind(s, f"ctrl{rank}") for rank, s in enumerate(self._ctrl)]
        self.workers = WorkerProcesses(cfg, ctrl_addrs, out_addr, beat_addr, make_worker_hooks)
        self.ready: dict[int, WorkerReady] = {}
        self.loads: list[WorkerLoad | None] = [None] * self.dp_size
        self.dead: dict[int, str] = {}  # rank -> why
        # rank -> why, while it sends no WorkerAlive or its loop does not turn (`_stuck`)
        self.unresponsive: dict[int, str] = {}
        self._stuck: set[int] = set()
        self._alive_at = [0.0] * self.dp_size  # each worker's last WorkerAlive
        self._watch = ProgressWatch(self.dp_size, cfg.server.watchdog_timeout_s)
        self._monitored_at = 0.0
        self.inflight: dict[str, InFlight] = {}
        self._tasks: list[asyncio.Task] = []
        self.kv_events: KVEventPublisher | None = None  # once the workers are ready
        self._dumps: dict[int, asyncio.Future[tuple[list[int], int]]] = {}  # by dump_id
        self._next_dump_id = 0
        # Called with the KV endpoints a worker lost (the decode front end's peer cache).
        self.kv_peers_lost_listeners: list[Callable[[list[str]], None]] = []
        self.rooms_unclaimed_listeners: list[Callable[[int, list[int]], None]] = []
        # Called with every output, awaited or not: a worker's output can come after its
        # request was cancelled (the client left), and what it did still happened.
        self.output_listeners: list[Callable[[ReqOutput], None]] = []

    def _bind(self, sock: zmq.Socket, name: str) -> str:
        """Bind `sock` in the private directory; a loopback port where its path is too long
        for a Unix socket (a long TMPDIR)."""
        path = os.path.join(self._ipc_dir.path, name)
        if len(path) < zmq.IPC_PATH_MAX_LEN:
            sock.bind(f"ipc://{path}")
            return f"ipc://{path}"
        return f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"

    # ---- start / stop
    async def start(self, timeout_s: float) -> None:
        """Spawn the workers and wait for every WorkerReady; WorkerStartError on failure."""
        deadline = time.monotonic() + timeout_s
        await self.workers.start(timeout_s)
        while len(self.ready) < self.dp_size:
            self._check_start_deaths()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.dp_size)) - set(self.ready))
                raise WorkerStartError(
                    f"workers {missing} not ready within {timeout_s:g} s (--worker-start-timeout-s)"
                )
            if await self._out.poll(int(MONITOR_INTERVAL_S * 1000)):
                msg = _decode_or_drop(await self._out.recv())
                if isinstance(msg, WorkerFailed):
                    raise WorkerStartError(f"worker {msg.dp_rank} failed to start: {msg.error}")
                if isinstance(msg, WorkerReady):
                    self.ready[msg.dp_rank] = msg
                    logger.info("worker %d ready (%d KV pages)", msg.dp_rank, msg.num_total_pages)
        self._start_kv_events()
        self._alive_at = [time.monotonic()] * self.dp_size
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._receive_beats()),
            asyncio.create_task(self._monitor()),
        ]

    def _start_kv_events(self) -> None:
        layout = next(iter(self.ready.values())).kv_layout
        fingerprint = layout.model_fingerprint if layout is not None else ""
        server = self.cfg.server
        self.kv_events = KVEventPublisher(
            self.ctx,
            server.host,
            (server.kv_events_port, server.kv_events_replay_port),
            self.dp_size,
            self.page_size,
            hash_seed(fingerprint, self.page_size),
            advertise_host=server.advertise_host,
        )
        self.kv_events.start()

    def _check_start_deaths(self) -> None:
        for rank in range(self.dp_size):
            code = self.workers.exit_code(rank)
            if code is not None:
                raise WorkerStartError(f"worker {rank} exited with code {code} during start")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.kv_events is not None:
            await self.kv_events.stop()
        await asyncio.to_thread(self.workers.stop)
        self.ctx.destroy(linger=0)
        self._ipc_dir.close()

    # ---- facts from the workers
    @property
    def max_context_len(self) -> int:
        return min(r.max_context_len for r in self.ready.values())

    @property
    def vocab_size(self) -> int:
        return min(r.vocab_size for r in self.ready.values())

    @property
    def page_size(self) -> int:
        return next(iter(self.ready.values())).page_size

    @property
    def pool_tokens(self) -> int:
        """The most KV tokens one request can hold: the smallest worker pool."""
        return min(r.num_total_pages * r.page_size for r in self.ready.values())

    # ---- dispatch
    def down(self, rank: int) -> str | None:
        """Why worker `rank` takes no request now (dead, or not responding), or None."""
        return self.dead.get(rank) or self.unresponsive.get(rank)

    def inflight_counts(self) -> tuple[list[int], list[int]]:
        """(requests, tokens) per rank, as the front end itself accounts them."""
        reqs, tokens = [0] * self.dp_size, [0] * self.dp_size
        for flight in self.inflight.values():
            reqs[flight.dp_rank] += 1
            tokens[flight.dp_rank] += flight.num_tokens
        return reqs, tokens

    def rank_loads(self) -> list[RankLoad]:
        reqs, tokens = self.inflight_counts()
        # The front end's own counts are current; a worker's report can be 50 ms old but also
        # sees work the front end has let go of (an abort still in the worker's queue).
        for rank, load in enumerate(self.loads):
            if load is not None:
                reqs[rank] = max(reqs[rank], load.num_running + load.num_waiting)
                tokens[rank] = max(tokens[rank], load.num_tokens)
        return [
            RankLoad(num_reqs=reqs[r], num_tokens=tokens[r], alive=self.down(r) is None)
            for r in range(self.dp_size)
        ]

    def choose_rank(self, room: int | None, routed_rank: int | None) -> int:
        why = None if routed_rank is None else self.down(routed_rank)
        if why is not None:
            raise RequestError(503, f"dp rank {routed_rank} is not running: {why}")
        return self.policy.choose(self.rank_loads(), room, routed_rank)

    def submit(self, req: GenerateReq, dp_rank: int) -> InFlight:
        """Register the request and send it to worker `dp_rank`."""
        if req.rid in self.inflight:
            raise RequestError(400, f"rid {req.rid!r} is already in flight")
        why = self.down(dp_rank)
        if why is not None:
            raise RequestError(503, why)
        message = protocol.encode(req)  # before registering: a failure here leaks no rid
        flight = InFlight(req=req, dp_rank=dp_rank, num_tokens=len(req.input_ids))
        self.inflight[req.rid] = flight
        self._ctrl[dp_rank].send(message)
        return flight

    def forget(self, rid: str) -> None:
        """The front end is done with `rid`; later messages for it are dropped."""
        self.inflight.pop(rid, None)

    def abort(self, rid: str, reason: str, room: int | None = None) -> bool:
        """Abort request `rid`; with `room`, only if it is that PD room's leg (a client's
        own rid may name another request than the one a router means to stop)."""
        flight = self.inflight.get(rid)
        if flight is None:
            return False
        disagg = flight.req.disagg
        if room is not None and (disagg is None or disagg.room != room):
            return False
        if flight.dp_rank not in self.dead:
            self._ctrl[flight.dp_rank].send(protocol.encode(AbortReq(rid, reason)))
        return True

    def abort_all(self, reason: str) -> int:
        return sum(self.abort(rid, reason) for rid in list(self.inflight))

    def fail_all(self, status: int, reason: str) -> int:
        """Answer every request in flight with error `status` now, and abort it in its
        worker; how many there were."""
        flights = list(self.inflight.values())
        for flight in flights:
            self._fail(flight, status, reason)
            self.abort(flight.req.rid, reason)
        return len(flights)

    async def flush_cache(self, timeout_s: float) -> list[int]:
        """Flush every live worker's cache; returns once each responsive one has (its load
        and KV events sent first), with the ranks that did not confirm it in `timeout_s`."""
        for rank in range(self.dp_size):
            if rank not in self.dead:  # an unresponsive one flushes when it runs again
                self._ctrl[rank].send(protocol.encode(FlushCache()))
        ranks = [rank for rank in range(self.dp_size) if self.down(rank) is None]
        # A worker answers a dump after the flush sent before it: that answer confirms it.
        dumps = [self.dump_cache(rank, timeout_s) for rank in ranks]
        results = await asyncio.gather(*dumps, return_exceptions=True)
        return [
            rank for rank, r in zip(ranks, results, strict=True) if isinstance(r, BaseException)
        ]

    async def dump_cache(self, dp_rank: int, timeout_s: float) -> tuple[list[int], int]:
        """Every page hash in worker `dp_rank`'s prefix cache now, and the last event batch
        published before it (TimeoutError past the deadline)."""
        why = self.down(dp_rank)
        if why is not None:
            raise RequestError(503, why)
        self._next_dump_id += 1
        dump_id = self._next_dump_id
        future = self._dumps[dump_id] = asyncio.get_running_loop().create_future()
        self._ctrl[dp_rank].send(protocol.encode(DumpCache(dump_id)))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._dumps.pop(dump_id, None)

    def room_failed(
        self, dp_rank: int, room: int, reason: str, status: int = 400, origin: str | None = None
    ) -> None:
        """For the prefill hooks: tell a worker that a room failed (before dispatch, or on
        decode: `origin` hooks.DECODE_ORIGIN when decode's own fault)."""
        self._ctrl[dp_rank].send(protocol.encode(RoomFailed(room, reason, status, origin)))

    def room_forwarded(self, home_rank: int, room: int, dp_rank: int, kv_endpoint: str) -> None:
        """For the prefill hooks: tell a room's home worker where the room was dispatched."""
        self._ctrl[home_rank].send(protocol.encode(RoomForwarded(room, dp_rank, kv_endpoint)))

    # ---- background tasks
    async def _receive(self) -> None:
        while True:
            msg = _decode_or_drop(await self._out.recv())
            rank = getattr(msg, "dp_rank", 0)
            if not 0 <= rank < self.dp_size:  # indexing by it raised, and ended this loop
                logger.warning(
                    "dropped a %s of dp_rank %d: no such worker", type(msg).__name__, rank
                )
                continue
            try:
                self._on_message(msg)
            except Exception:  # a bug here must not end the task: every request would hang
                logger.exception("error handling a message from the workers")

    def _on_message(self, msg: protocol.FromWorker | None) -> None:
        if isinstance(msg, ReqOutputs):
            for output in msg.outputs:
                self._deliver(output)
        elif isinstance(msg, ReqOutput):
            self._deliver(msg)
        elif isinstance(msg, WorkerLoad):
            if msg.dp_rank not in self.dead:  # a report it sent before dying is stale
                self.loads[msg.dp_rank] = msg
                self.metrics.observe_load(msg)
        elif isinstance(msg, KVCacheEvents):
            if self.kv_events is not None:
                dropped = self.kv_events.num_dropped_batches
                self.kv_events.publish(msg.dp_rank, msg.events)
                self.metrics.kv_events_dropped.inc(self.kv_events.num_dropped_batches - dropped)
        elif isinstance(msg, CacheDump):
            future = self._dumps.get(msg.dump_id)
            if future is not None and not future.done():
                seq = self.kv_events.stream.seq if self.kv_events else 0
                future.set_result((msg.page_hashes, seq))
        elif isinstance(msg, KVPeersLost):
            for listener in self.kv_peers_lost_listeners:
                listener(msg.endpoints)
        elif isinstance(msg, RoomsUnclaimed):
            for rooms_listener in self.rooms_unclaimed_listeners:
                rooms_listener(msg.dp_rank, msg.rooms)
        elif isinstance(msg, WorkerFailed):
            self._mark_dead(msg.dp_rank, f"worker {msg.dp_rank} failed: {msg.error}")

    def _deliver(self, msg: ReqOutput) -> None:
        for listener in self.output_listeners:
            listener(msg)
        flight = self.inflight.get(msg.rid)
        if flight is not None:
            flight.num_tokens += len(msg.new_token_ids)
            flight.outputs.put_nowait(msg)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)  # a periodic check, not a synchronisation
            for rank in range(self.dp_size):
                death = self.workers.death(rank)
                if death is not None and rank not in self.dead:
                    self._mark_dead(rank, death)
            self._check_beats(time.monotonic())

    async def _receive_beats(self) -> None:
        while True:
            msg = _decode_or_drop(await self._beats.recv())
            if isinstance(msg, WorkerAlive) and 0 <= msg.dp_rank < self.dp_size:
                try:
                    self._on_beat(msg, time.monotonic())
                except Exception:  # a bug here must not end the task: all would go silent
                    logger.exception("error handling a beat of worker %d", msg.dp_rank)

    def _on_beat(self, msg: WorkerAlive, now: float) -> None:
        """A beat ends a silence; only a turn of the loop ends a stall."""
        rank = msg.dp_rank
        self._alive_at[rank] = now
        turned = self._watch.on_beat(rank, msg.step, now)
        if rank in self.unresponsive and (turned or rank not in self._stuck):
            del self.unresponsive[rank]
            what = "its loop turns" if rank in self._stuck else "it beats"
            logger.warning("worker %d responds again (%s)", rank, what)
            self._stuck.discard(rank)
        # The front end's own requests count too: the worker may be stuck taking one in.
        busy = msg.busy or any(f.dp_rank == rank for f in self.inflight.values())
        stalled_s = self._watch.stuck_for(rank, busy, now)
        if stalled_s is not None and self.down(rank) is None and not self._ran_late(now):
            self._stuck.add(rank)
            self._mark_unresponsive(
                rank,
                f"dp worker {rank} is not responding (no progress for {stalled_s:.1f} s with "
                f"work, past --watchdog-timeout {self._watch.timeout_s:g} s: its loop is "
                f"stuck, or in one very long step)",
            )
            self._dump_stacks(rank)

    def _check_beats(self, now: float) -> None:
        """Mark workers that sent no WorkerAlive for the timeout unresponsive. A monitor
        that itself ran late (the event loop was blocked, or this process stopped too)
        judges no one and gives every worker a whole timeout from now: their beats may be
        waiting unread in the socket."""
        timeout_s = self.cfg.server.worker_heartbeat_timeout_s
        late = self._ran_late(now)
        self._monitored_at = now
        if late:
            self._alive_at = [max(t, now) for t in self._alive_at]
            self._watch.excuse(now)
        if timeout_s <= 0 or late:
            return
        for rank in range(self.dp_size):
            silent_s = now - self._alive_at[rank]
            if silent_s > timeout_s and self.down(rank) is None:
                self._mark_unresponsive(
                    rank,
                    f"dp worker {rank} is not responding (no heartbeat for {silent_s:.1f} s: "
                    f"stopped, or stuck)",
                )

    def _ran_late(self, now: float) -> bool:
        """The monitor missed its turns until `now`: this process did not run (its loop was
        blocked, or it was stopped with its workers), and what it did not see is no worker's
        silence or stall. A beat read before the monitor's next turn is judged by no one."""
        return now - self._monitored_at > max(1.0, self.cfg.server.worker_heartbeat_timeout_s / 2)

    def _mark_unresponsive(self, rank: int, reason: str) -> None:
        """Fail the worker's requests with a 503 and abort them there (the aborts wait in
        its socket: a worker that comes back frees their pages at once); take no more."""
        logger.error("%s; failing its in-flight requests", reason)
        self.unresponsive[rank] = reason
        for flight in list(self.inflight.values()):
            if flight.dp_rank == rank:
                self._fail(flight, 503, reason)
                self._ctrl[rank].send(protocol.encode(AbortReq(flight.req.rid, reason)))

    def _dump_stacks(self, rank: int) -> None:
        """Have a stuck worker write its threads' stacks to its stderr (this server's log)."""
        pid = self.workers.pids[rank]
        if pid is None:
            return
        logger.error("worker %d (pid %d): its stacks follow", rank, pid)
        try:
            os.kill(pid, STACKS_SIGNAL)
        except ProcessLookupError:
            pass  # it died meanwhile: the monitor reports that

    def _mark_dead(self, rank: int, reason: str) -> None:
        logger.error("%s; failing its in-flight requests", reason)
        self.dead.setdefault(rank, reason)
        self._zero_load(rank)
        for flight in self.inflight.values():
            if flight.dp_rank == rank:
                self._fail(flight, 500, reason)

    @staticmethod
    def _fail(flight: InFlight, status: int, reason: str) -> None:
        flight.outputs.put_nowait(
            ReqOutput(
                rid=flight.req.rid,
                finish_reason=FinishReason("abort", message=reason),
                error_status=status,
                error_message=reason,
            )
        )

    def _zero_load(self, rank: int) -> None:
        """A dead worker runs nothing and holds no pages, but its last report (requests
        running, pages used) would stand in `/get_load` and the gauges for good. Its
        lifetime counters stay, so the metric counters never go back."""
        last = self.loads[rank]
        if last is None:
            return  # it never reported: nothing of it is shown
        self.loads[rank] = msgspec.structs.replace(
            last, num_running=0, num_waiting=0, num_tokens=0, num_used_pages=0,
            num_free_pages=0, num_disagg_rooms=0, num_kv_peers=0, num_cached_pages=0,
            num_evictable_pages=0,
        )  # fmt: skip
        self.metrics.observe_load(self.loads[rank])
