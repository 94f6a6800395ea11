"""Process-tree lookups from /proc (Linux): a server's worker processes, and whatever is left
of a process group. Used by the chaos soak, in its own process."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str  # one letter: R, S, T (stopped), Z (zombie), ...
    cmdline: str


def info(pid: int) -> ProcInfo | None:
    """The process now, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # the command name in parentheses may hold spaces: the fields start after the last ")"
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0], cmdline)


def processes() -> list[ProcInfo]:
    found = (info(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [p for p in found if p is not None]


def children(pid: int) -> list[ProcInfo]:
    return [p for p in processes() if p.ppid == pid]


def worker_pids(frontend_pid: int) -> list[int]:
    """A server's worker processes: its spawned children, less multiprocessing's tracker."""
    return [
        p.pid
        for p in children(frontend_pid)
        if "spawn_main" in p.cmdline and "resource_tracker" not in p.cmdline and p.state != "Z"
    ]


def live_members(pgids: set[int]) -> list[ProcInfo]:
    """Processes still running (zombies excepted) in any of these process groups."""
    return [p for p in processes() if p.pgid in pgids and p.state != "Z"]
