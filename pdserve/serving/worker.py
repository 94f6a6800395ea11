"""The worker process: one engine, fed by the front end over ZeroMQ, one loop, no sleeps.

Started by `serving/launcher.py` (one per DP rank). Control messages in (PULL), outputs and
load reports out (PUSH); disaggregation plugs in through `WorkerHooks`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import zmq

from pdserve.procs import die_with_parent
from pdserve.serving import protocol
from pdserve.serving.config import WORKER_ALIVE_INTERVAL_S
from pdserve.serving.hooks import WorkerHooks, WorkerHooksFactory
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
from pdserve.serving.worker_io import output_to_msg, rejected_msg

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.serving.config import ServerConfig

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # also bounds how late an orphaned worker notices its parent died
STACKS_SIGNAL = signal.SIGUSR1  # dumps every thread's stack to the worker's stderr


class WorkerLoop:
    def __init__(
        self,
        engine: Engine,
        hooks: WorkerHooks,
        dp_rank: int,
        ctrl: zmq.Socket,
        out: zmq.Socket,
        launcher_pid: int,
        load_interval_s: float,
    ):
        self.engine, self.hooks, self.dp_rank = engine, hooks, dp_rank
        self.ctrl, self.out = ctrl, out
        self.launcher_pid = launcher_pid
        self.load_interval_s = load_interval_s
        self._last_load: WorkerLoad | None = None
        self._last_load_at = 0.0
        # Read by the heartbeat thread (`_beat`): the loop's turns, and whether it had work.
        self.step = 0
        self.busy = False

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in [self.ctrl, *self.hooks.sockets()]:
            poller.register(sock, zmq.POLLIN)
        while os.getppid() == self.launcher_pid:
            idle = not (self.engine.has_work() or self.hooks.busy())
            self.step, self.busy = self.step + 1, not idle
            poller.poll(IDLE_POLL_MS if idle else 0)
            self._drain_control()
            self._send(self.hooks.poll(time.monotonic()))
            self._report_lost_peers()
            if self.engine.has_work():
                steps = self.engine.step()
                outputs = [output_to_msg(o) for o in steps]
                held = {o.rid: o.held_page_ids for o in steps if o.held_page_ids is not None}
                self._send(self.hooks.after_step(time.monotonic(), outputs, held))
            self._forward_cache_events()
            self._report_load(time.monotonic())
        logger.info("the front end is gone; worker %d exits", self.dp_rank)

    def _drain_control(self) -> None:
        while True:
            try:
                data = self.ctrl.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(self._handle(protocol.decode_to_worker(data)))

    def _handle(self, msg: protocol.ToWorker) -> list[ReqOutput]:
        from pdserve.engine.request import RequestRejected

        if isinstance(msg, GenerateReq):
            try:
                return self.hooks.on_generate(msg)
            except RequestRejected as exc:
                return [rejected_msg(msg.rid, str(exc), 400)]
            except Exception as exc:  # one bad request must not take the worker down
                logger.exception("request %s failed on admission", msg.rid)
                return [rejected_msg(msg.rid, f"worker error: {exc}", 500)]
        if isinstance(msg, AbortReq):
            # The hooks first: a PD room keeps the pages a transfer may still write out of
            # use, which the engine's abort alone would free (and answers the request then).
            outputs = self.hooks.on_abort(msg.rid, msg.reason)
            out = self.engine.abort(msg.rid, msg.reason)
            return outputs + ([output_to_msg(out)] if out is not None else [])
        if isinstance(msg, RoomFailed):
            return self.hooks.on_room_failed(msg)
        if isinstance(msg, RoomForwarded):
            return self.hooks.on_room_forwarded(msg)
        if isinstance(msg, FlushCache):
            self.engine.flush_cache()
            # Out before the answer to a DumpCache that follows (the front end's flush
            # waits for one): its /get_load then shows the flushed cache.
            self._forward_cache_events()
            self._last_load = None
            self._report_load(time.monotonic())
        if isinstance(msg, DumpCache):
            # Events first, so a dump never runs ahead of what subscribers were told.
            self._forward_cache_events()
            hashes = self.engine.cached_page_hashes()
            dump = CacheDump(dump_id=msg.dump_id, dp_rank=self.dp_rank, page_hashes=hashes)
            self.out.send(protocol.encode(dump))
        return []

    def _report_lost_peers(self) -> None:
        endpoints = self.hooks.lost_kv_peers()
        if endpoints:
            msg = KVPeersLost(dp_rank=self.dp_rank, endpoints=endpoints)
            self.out.send(protocol.encode(msg))
        rooms = self.hooks.unclaimed_rooms()
        if rooms:
            self.out.send(protocol.encode(RoomsUnclaimed(dp_rank=self.dp_rank, rooms=rooms)))

    def _forward_cache_events(self) -> None:
        events = self.engine.drain_cache_events()
        if events:
            self.out.send(protocol.encode(KVCacheEvents(dp_rank=self.dp_rank, events=events)))

    def _send(self, msgs: list[ReqOutput]) -> None:
        if len(msgs) == 1:
            self.out.send(protocol.encode(msgs[0]))
        elif msgs:  # a step's outputs in one message, in their order
            self.out.send(protocol.encode(ReqOutputs(outputs=msgs)))

    def _report_load(self, now: float) -> None:
        num_running, num_waiting = self.engine.num_reqs()
        num_waiting += self.hooks.num_parked()
        last = self._last_load
        # Request counts go out at once; token and page counts at most once per interval
        # (checked first: summing tokens over thousands of held requests each turn of the
        # loop was a tenth of a busy prefill worker's time).
        counts_changed = last is None or (last.num_running, last.num_waiting) != (
            num_running,
            num_waiting,
        )
        if not counts_changed and now - self._last_load_at < self.load_interval_s:
            return
        num_tokens = self.engine.load()[2]
        num_tokens += self.hooks.num_parked_tokens()
        load = WorkerLoad(
            dp_rank=self.dp_rank,
            num_running=num_running,
            num_waiting=num_waiting,
            num_tokens=num_tokens,
            num_used_pages=self.engine.num_used_pages,
            num_free_pages=self.engine.num_free_pages,
            num_total_pages=self.engine.num_total_pages,
            num_disagg_rooms=self.hooks.num_rooms(),
            num_kv_peers=self.hooks.num_kv_peers(),
            **self.engine.cache_stats(),
            num_auth_refusals=self.hooks.num_auth_refusals(),
            num_preemptions=self.engine.num_preemptions,
        )
        if last != load:
            self.out.send(protocol.encode(load))
        self._last_load, self._last_load_at = load, now


def worker_main(
    cfg: ServerConfig,
    dp_rank: int,
    ctrl_addr: str,
    out_addr: str,
    beat_addr: str,
    front_end_pid: int,
    make_hooks: WorkerHooksFactory,
) -> None:
    """Entry point of a worker process (the multiprocessing target, launcher.py); `make_hooks`
    builds the worker's hooks once its engine is up."""
    die_with_parent(signal.SIGKILL)
    # The process that started this one: the front end, or its fork server, which exits with
    # it. This process exits when that one does (the loop watches it, the kernel signals).
    launcher_pid = os.getppid()
    _release_fork_server()
    if not _alive(front_end_pid):  # it died before the signal was asked for
        sys.exit(0)
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's default stop, `pdserve
    # up`'s), reach the workers too: the front end drains their requests, then stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The front end's watchdog asks a stuck worker where it hangs (faulthandler writes the
    # stacks from the signal handler itself, whatever the main thread is doing).
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    logging.basicConfig(
        level=cfg.server.log_level.upper(),
        format=f"%(asctime)s [worker dp={dp_rank}] %(levelname)s %(name)s: %(message)s",
    )
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.PULL)
    ctrl.connect(ctrl_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 1000)
    out.connect(out_addr)
    try:
        loop = _start(cfg, dp_rank, ctrl, out, launcher_pid, make_hooks)
    except Exception as exc:
        traceback.print_exc()
        out.send(
            protocol.encode(WorkerFailed(dp_rank=dp_rank, error=f"{type(exc).__name__}: {exc}"))
        )
        out.close()
        sys.exit(1)
    beat = threading.Thread(target=_beat, args=(ctx, beat_addr, loop), daemon=True)
    beat.start()
    try:
        loop.run()
    except Exception as exc:
        traceback.print_exc()
        out.send(
            protocol.encode(WorkerFailed(dp_rank=dp_rank, error=f"worker loop crashed: {exc!r}"))
        )
        out.close()
        sys.exit(1)
    finally:
        loop.hooks.close()


def _beat(ctx: zmq.Context, beat_addr: str, loop: WorkerLoop) -> None:
    """Send WorkerAlive every WORKER_ALIVE_INTERVAL_S from a thread of its own, to a socket of
    its own on the front end (never queued behind outputs): the front end tells a stopped
    process from one computing a long step by it, and a stuck loop by its step."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 4)  # a front end that stopped reading needs no backlog
    sock.connect(beat_addr)
    encoder = msgspec.msgpack.Encoder()  # its own: the loop's thread encodes meanwhile
    while True:
        alive = WorkerAlive(dp_rank=loop.dp_rank, step=loop.step, busy=loop.busy)
        try:
            sock.send(encoder.encode(alive), zmq.NOBLOCK)
        except zmq.Again:
            pass
        time.sleep(WORKER_ALIVE_INTERVAL_S)  # a period, not a synchronisation


def _release_fork_server() -> None:
    """Close this process's copy of the fork server's "alive" pipe. multiprocessing gives
    every process the fork server starts the pipe's write end, and the fork server exits
    once no process holds it; a worker holding it would keep its parent, and so itself,
    alive after the front end died. Nothing to do in a spawned worker."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (the pid was reused)
        return True
    return True


def _stop_detokenizer(model_dir: str) -> Callable[[list[int]], str]:
    """What the engine decodes output tails with. The `tokenizers` library reads the same
    tokenizer.json as the front end's tokenizer without importing transformers, which
    takes about half of a worker's start-up time."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode


def _start(
    cfg: ServerConfig,
    dp_rank: int,
    ctrl: zmq.Socket,
    out: zmq.Socket,
    launcher_pid: int,
    make_hooks: WorkerHooksFactory,
) -> WorkerLoop:
    import torch

    from pdserve.engine.engine import Engine
    from pdserve.engine.loader import resolve_model_dir

    torch.set_num_threads(cfg.engine.torch_threads)
    # The engine checks stop strings itself, so a stopped request frees its pages at once.
    detokenize = _stop_detokenizer(resolve_model_dir(cfg.engine.model_path))
    engine = Engine.from_config(cfg.engine, detokenize=detokenize, dp_rank=dp_rank)
    hooks = make_hooks(cfg, engine, dp_rank)
    ready = WorkerReady(
        dp_rank=dp_rank,
        num_total_pages=engine.num_total_pages,
        page_size=engine.page_size,
        max_context_len=engine.max_context_len,
        vocab_size=engine.model.args.vocab_size,
        kv_endpoint=hooks.kv_endpoint,
        kv_layout=engine.kv_layout(),
    )
    out.send(protocol.encode(ready))
    logger.info("ready: %d pages of %d tokens", engine.num_total_pages, engine.page_size)
    return WorkerLoop(
        engine, hooks, dp_rank, ctrl, out, launcher_pid, cfg.server.load_report_interval_s
    )
