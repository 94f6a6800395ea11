"""Starting and stopping a server's worker processes. Runs in the front-end process."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import time

from pdserve.serving.config import ServerConfig
from pdserve.serving.hooks import WorkerHooksFactory
from pdserve.serving.worker import worker_main


class WorkerProcesses:
    """One spawned process per DP rank; they connect to the front end's ZeroMQ endpoints.
    `make_hooks` travels to each by pickle (a module-level function), `cfg` too."""

    def __init__(
        self,
        cfg: ServerConfig,
        ctrl_addrs: list[str],
        out_addr: str,
        beat_addr: str,
        make_hooks: WorkerHooksFactory,
    ):
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = [
            ctx.Process(
                target=worker_main,
                args=(cfg, rank, ctrl_addrs[rank], out_addr, beat_addr, os.getpid(), make_hooks),
                name=f"pdserve-worker-{rank}",
                daemon=True,
            )
            for rank in range(cfg.server.dp_size)
        ]

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    def exit_code(self, rank: int) -> int | None:
        """None while the worker runs."""
        proc = self.procs[rank]
        return None if proc.is_alive() else proc.exitcode

    @property
    def pids(self) -> list[int | None]:
        return [proc.pid for proc in self.procs]

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every worker, then SIGKILL whatever is left at the deadline."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
