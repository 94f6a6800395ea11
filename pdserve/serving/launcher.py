"""Starting and stopping a server's worker processes. Runs in the front-end process.

Workers start from a fork server (multiprocessing's `forkserver` method) that has imported
torch and the engine once: each worker is then a fork of it, with no import of its own
(about 2 s of CPU per worker, which `spawn` pays in every one), and the fork server's one
import overlaps the front end's own start-up (`prestart`). The fork server never touches a
GPU, so each worker initialises CUDA itself. The front end stops it as it exits
(`stop_helpers`); killed, the front end leaves it to exit by itself, its workers with it
(each dies with its parent). `PDSERVE_WORKER_MULTIPROC_METHOD=spawn` starts
every worker from a fresh interpreter instead (vLLM's VLLM_WORKER_MULTIPROC_METHOD).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker as resource_tracker
import os
import select
import signal
import sys
import tempfile
import threading
import time

from pdserve import envs
from pdserve.serving.config import ServerConfig
from pdserve.serving.hooks import WorkerHooksFactory
from pdserve.serving.ipc_dir import IpcDir
from pdserve.serving.worker import worker_main

logger = logging.getLogger(__name__)

METHODS = ("forkserver", "spawn")
# What the fork server imports before its first fork: the heavy part of a worker's start.
PRELOAD = [
    "pdserve.serving.fork_server_init",  # first: SIGTERM ignored from the start
    "torch",
    "pdserve.engine.engine",
    "pdserve.serving.worker",
]
RESOURCE_TRACKER_EXIT_S = 2.0  # its wait for the last worker's end of its pipe to close


class WorkerStartError(RuntimeError):
    pass


def start_method() -> str:
    """How workers start: PDSERVE_WORKER_MULTIPROC_METHOD, `forkserver` by default (`spawn`
    where the platform has no fork server). ValueError for another value."""
    method = envs.worker_multiproc_method() or "forkserver"
    if method not in METHODS:
        raise ValueError(
            f"PDSERVE_WORKER_MULTIPROC_METHOD={method!r}: expected one of {', '.join(METHODS)}"
        )
    if method == "forkserver" and not _fork_server_possible():
        return "spawn"
    return method


# The fork server's socket, `$TMPDIR/pdserve-XXXXXXXX/listener-XXXXXXXX` (`_own_socket_dir`),
# must fit a Unix socket address.
_SOCKET_TAIL_LEN = len("/pdserve-XXXXXXXX/listener-XXXXXXXX")
_UNIX_PATH_MAX = 108 if sys.platform.startswith("linux") else 104  # sun_path, NUL included


def _fork_server_possible() -> bool:
    """Whether this platform has a fork server and $TMPDIR is short enough for its socket."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" in methods and not _tmpdir_too_long()


def _tmpdir_too_long() -> bool:
    """A long $TMPDIR failed every start in a traceback: "OSError: AF_UNIX path too long"."""
    return len(os.fsencode(tempfile.gettempdir())) + _SOCKET_TAIL_LEN >= _UNIX_PATH_MAX


# Where the fork server's socket is bound (`_own_socket_dir`).
_socket_dir: IpcDir | None = None


def prestart() -> None:
    """Start the fork server now (it imports `PRELOAD`), so that its imports run while the
    front end starts; the first worker would start it otherwise."""
    method = start_method()
    if envs.worker_multiproc_method() != "spawn" and _tmpdir_too_long():
        _warn_spawn_instead(tempfile.gettempdir())
    if method == "forkserver":
        _own_socket_dir()
        multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
        multiprocessing.forkserver.ensure_running()


@functools.cache
def _warn_spawn_instead(tmpdir: str) -> None:
    logger.warning(
        "workers start by spawn, not from a fork server (slower): its socket path under "
        "$TMPDIR %s would be too long for a Unix socket",
        tmpdir,
    )


def _own_socket_dir() -> None:
    """multiprocessing binds the fork server's socket in a `pymp-*` directory that only a
    clean exit removes: every front end killed left one in $TMPDIR for good. It is bound
    in an `IpcDir` instead, which the next server removes once this process is gone."""
    global _socket_dir
    config = multiprocessing.process.current_process()._config
    if _socket_dir is None and config.get("tempdir") is None:
        _socket_dir = IpcDir()
        config["tempdir"] = _socket_dir.path  # multiprocessing.util.get_temp_dir's
        atexit.register(_socket_dir.close)


def stop_helpers() -> None:
    """Stop what multiprocessing started beside the workers, once they are stopped: the
    fork server, then the resource tracker. Each exits by itself once the front end is
    gone, but as an orphan meanwhile."""
    stop_fork_server()
    _stop_resource_tracker(RESOURCE_TRACKER_EXIT_S)


def _stop_resource_tracker(timeout_s: float) -> None:
    """Close this process's end of the resource tracker's pipe and reap the tracker once
    it has exited (it first frees what dead workers leaked); SIGKILL it at the deadline,
    where a worker that could not be killed still holds its pipe."""
    # multiprocessing's own records (CPython 3.10-3.13); absent elsewhere: left to exit
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    pid, fd = getattr(tracker, "_pid", None), getattr(tracker, "_fd", None)
    if pid is None or fd is None:
        return
    tracker._pid = tracker._fd = None
    os.close(fd)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)  # waitpid has no timeout


def stop_fork_server() -> None:
    """Stop this process's fork server and reap it (after its workers are stopped): it exits
    by itself once the front end is gone, but a moment later, as an orphan meanwhile, and
    seconds later where it is still importing `PRELOAD` (a start that failed early)."""
    server = multiprocessing.forkserver._forkserver
    pid = _fork_server_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # it holds nothing to save; its workers are gone
        with contextlib.suppress(OSError):  # it closes its pipe, reaps it, unlinks its socket
            stop = getattr(server, "_stop", None)  # CPython's; absent: it exits by itself
            if stop is not None:
                stop()
    if _socket_dir is not None:
        _socket_dir.close()


def _fork_server_pid() -> int | None:
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


def _settle(future: asyncio.Future, result: BaseException | None) -> None:
    if not future.done():
        future.set_result(result)


def _fork_server_death(wait_s: float = 0.0) -> str | None:
    """How this process's fork server ended ("was killed by signal 15"), or None while it
    runs. Not reaped here (WNOWAIT): `stop_fork_server` does that. `wait_s` waits that long
    for its end first: a dying process closes its sockets (a start sees EOF) before the
    kernel reports its exit."""
    pid = _fork_server_pid()
    if pid is None:
        return None
    if wait_s > 0:
        _wait_for_exit(pid, wait_s)
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "is gone"
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return f"exited with code {info.si_status}"
    return f"was killed by signal {info.si_status}"


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    """Block until child `pid` has exited or `timeout_s` passed (a pidfd turns readable at
    the exit); no wait where pidfds are missing (Linux before 5.3, other systems)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return
    try:
        select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)


class WorkerProcesses:
    """One process per DP rank (`start_method`); they connect to the front end's ZeroMQ
    endpoints. `make_hooks` travels to each by pickle (a module-level function), `cfg` too."""

    def __init__(
        self,
        cfg: ServerConfig,
        ctrl_addrs: list[str],
        out_addr: str,
        beat_addr: str,
        make_hooks: WorkerHooksFactory,
    ):
        prestart()  # already done by `pdserve serve`; not by a controller made elsewhere
        self.method = start_method()
        ctx = multiprocessing.get_context(self.method)
        self.procs: list[multiprocessing.process.BaseProcess] = [
            ctx.Process(
                target=worker_main,
                args=(cfg, rank, ctrl_addrs[rank], out_addr, beat_addr, os.getpid(), make_hooks),
                name=f"pdserve-worker-{rank}",
                daemon=True,
            )
            for rank in range(cfg.server.dp_size)
        ]

    async def start(self, timeout_s: float) -> None:
        """Start every worker process. From a fork server each start waits for its answer
        (the new pid), which a stopped or stuck fork server never gives: the starts run in a
        thread of their own, and past `timeout_s` the fork server is killed, which ends that
        wait. WorkerStartError then, or where a start failed (the fork server died)."""
        logger.info("starting %d worker process(es) (%s)", len(self.procs), self.method)
        loop = asyncio.get_running_loop()
        started: asyncio.Future[BaseException | None] = loop.create_future()

        def run() -> None:
            error: BaseException | None = None
            try:
                for proc in self.procs:
                    proc.start()
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, started, error)

        # A daemon thread, not the loop's executor, whose threads the exit would wait for
        threading.Thread(target=run, name="pdserve-worker-start", daemon=True).start()
        try:
            error = await asyncio.wait_for(asyncio.shield(started), timeout_s)
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
            if self.method != "forkserver":
                raise WorkerStartError(
                    f"workers not started within {timeout_s:g} s (--worker-start-timeout-s)"
                ) from None
            pid = _fork_server_pid()
            stop_fork_server()
            raise WorkerStartError(
                f"the fork server (pid {pid}) did not start the workers within "
                f"{timeout_s:g} s (--worker-start-timeout-s; stopped or stuck); it was killed"
            ) from None
        if error is not None:
            # A failed start is the fork server dying, or the start's own error (the server
            # runs on): a second is what it may take to tell them apart
            why = _fork_server_death(1.0) if self.method == "forkserver" else None
            cause = f" (the fork server {why})" if why is not None else ""
            reason = str(error) or type(error).__name__
            raise WorkerStartError(f"starting the workers failed: {reason}{cause}")

    def exit_code(self, rank: int) -> int | None:
        """None while the worker runs."""
        proc = self.procs[rank]
        return None if proc.is_alive() else proc.exitcode

    def death(self, rank: int) -> str | None:
        """Why worker `rank` is gone, or None while it runs. A fork server that died took
        its workers with it (each dies with its parent): multiprocessing then gives each
        the exit code 255, which names no cause."""
        code = self.exit_code(rank)
        if code is None:
            return None
        why = _fork_server_death() if self.method == "forkserver" else None
        if why is not None:
            return f"worker {rank} was killed with its fork server, which {why}"
        return f"worker {rank} exited unexpectedly with code {code}"

    @property
    def pids(self) -> list[int | None]:
        return [proc.pid for proc in self.procs]

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every worker and wait up to `timeout_s` for their ends. A worker ignores
        SIGTERM (a group's is for the front end, which drains first) and has nothing to
        save: it kept no state a SIGTERM's default death would have written out either."""
        started = [proc for proc in self.procs if proc.pid is not None]  # a start may have failed
        for proc in started:
            if proc.is_alive():
                proc.kill()
        deadline = time.monotonic() + timeout_s
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
