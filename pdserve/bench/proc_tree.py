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


def worker_pids(frontend_pid: int) -> list[int]:
    """A server's worker processes, by pid: the children of its fork server (the default:
    serving/launcher.py), or its spawned children; never multiprocessing's resource tracker
    or the fork server itself."""
    procs = [p for p in processes() if p.state != "Z"]
    kids = [p for p in procs if p.ppid == frontend_pid]
    fork_servers = {p.pid for p in kids if "multiprocessing.forkserver" in p.cmdline}
    return sorted(
        p.pid
        for p in procs
        if p.ppid in fork_servers
        or (
            p.ppid == frontend_pid
            and "spawn_main" in p.cmdline
            and "resource_tracker" not in p.cmdline
        )
    )


def live_members(pgids: set[int]) -> list[ProcInfo]:
    """Processes still running (zombies excepted) in any of these process groups."""
    return [p for p in processes() if p.pgid in pgids and p.state != "Z"]
