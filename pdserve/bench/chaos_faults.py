"""The soak's fault injector: applies one `Fault` to a server or one of its workers and waits
until it is over (the pause ended, or the server is back and ready). Runs in the chaos
process's main thread while the load clients run in others."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable

from pdserve.bench import proc_tree
from pdserve.bench.chaos_cluster import Node, finished_ok, http
from pdserve.bench.chaos_core import Fault, FaultRecord

POLL_S = 0.1
UNHEALTHY_DEADLINE_S = 10.0  # a server with a dead worker must say so by then
WORKERS_EXIT_DEADLINE_S = 10.0  # workers of a killed front end must be gone by then


class Injector:
    def __init__(
        self, nodes: dict[str, Node], rng: random.Random, now_s: Callable[[], float],
        ready_timeout_s: float, rejoin_timeout_s: float, load_over: threading.Event,
    ):  # fmt: skip
        self.nodes, self.rng, self.now_s = nodes, rng, now_s
        self.ready_timeout_s = ready_timeout_s
        self.rejoin_timeout_s = rejoin_timeout_s
        self.load_over = load_over

    def apply(self, fault: Fault) -> FaultRecord:
        node = self.nodes[fault.target]
        record = FaultRecord(fault.kind, fault.target, round(self.now_s(), 3), fault.pause_s)
        getattr(self, "_" + fault.kind)(node, fault, record)
        return record

    # -- pauses --------------------------------------------------------------------------
    def _stop_server(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        node.signal_group(signal.SIGSTOP)
        try:
            time.sleep(fault.pause_s)
        finally:
            node.signal_group(signal.SIGCONT)

    def _stop_worker(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        pid = self._pick_worker(node, record)
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(fault.pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)

    # -- kills, each followed by a restart on the same ports -----------------------------
    def _kill_server(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        node.signal_group(signal.SIGKILL)
        node.stop()  # reaps the leader
        time.sleep(fault.pause_s)
        self._restart(node, record)

    def _kill_frontend(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        workers = node.worker_pids()
        os.kill(node.pid, signal.SIGKILL)
        gone_s = _wait(lambda: all(_gone(p) for p in workers), WORKERS_EXIT_DEADLINE_S)
        record.detected_s = None if gone_s is None else round(gone_s, 3)
        if not workers:  # nothing was watched: no claim either way
            record.note, record.skipped = "no worker process found", True
        elif gone_s is None:
            record.note = (
                f"workers {workers} outlived their front end by {WORKERS_EXIT_DEADLINE_S} s"
            )
        else:
            record.note = f"workers exited {gone_s:.2f} s after their front end"
        node.stop()  # kills whatever is left of the group
        time.sleep(fault.pause_s)
        self._restart(node, record)

    def _kill_worker(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        pid = self._pick_worker(node, record)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        seen_s = _wait(lambda: http("GET", node.url + "/health", timeout_s=2)[0] != 200,
                       UNHEALTHY_DEADLINE_S)  # fmt: skip
        record.detected_s = None if seen_s is None else round(seen_s, 3)
        record.note += "; " + (
            f"reported unhealthy {seen_s:.2f} s after worker {pid} died"
            if seen_s is not None
            else f"still healthy {UNHEALTHY_DEADLINE_S} s after worker {pid} died"
        )
        node.stop()
        self._restart(node, record)

    def _restart_server(self, node: Node, fault: Fault, record: FaultRecord) -> None:
        """A rolling restart: the server drains its requests on SIGTERM before it exits, so
        `ready` counts that stop too, and the note says how long it took. It is started
        again at once: the report showed the pause drawn, as if it had been down that long."""
        record.pause_s = 0.0
        started = time.monotonic()
        node.stop()
        stop_s, code = time.monotonic() - started, node.exit_code()
        record.note = (
            f"drained and exited in {stop_s:.2f} s"
            if code == 0
            else f"exit code {code} after {stop_s:.2f} s: not a clean drain"
        )
        self._restart(node, record)

    def _restart(self, node: Node, record: FaultRecord) -> None:
        node.start()
        node.wait_ready(self.ready_timeout_s)
        ready_at = self.now_s()
        record.ready_s = round(ready_at - record.at_s, 3)
        if node.role == "router":
            return
        rejoined = _wait(
            lambda: (finished_ok(node.url) or 0) > 0 or self.load_over.is_set(),
            self.rejoin_timeout_s,
        )
        if rejoined is not None and not self.load_over.is_set():
            record.rejoined_s = round(self.now_s() - ready_at, 3)

    def _pick_worker(self, node: Node, record: FaultRecord) -> int | None:
        pids = node.worker_pids()
        if not pids:
            record.note, record.skipped = "no worker process found", True
            return None
        pid = self.rng.choice(sorted(pids))
        record.note = f"worker pid {pid} of {sorted(pids)}"
        return pid


def _gone(pid: int) -> bool:
    info = proc_tree.info(pid)
    return info is None or info.state == "Z"


def _wait(cond: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until `cond` held, polled; None at the deadline."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            return None
        time.sleep(POLL_S)
    return time.monotonic() - start
