"""Chaos soak, the pure part: the seeded choice of faults, how one answer is judged, and the
summary with its verdict. No I/O and no clock: `chaos.py` (the chaos process) feeds it."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# what the injector can do to a server (its whole process group) or to one of its workers
FAULT_KINDS = (
    "kill_server",  # SIGKILL the group, restart on the same ports
    "kill_frontend",  # SIGKILL the front end alone: its workers must exit by themselves
    "stop_server",  # SIGSTOP the group, SIGCONT after a pause
    "kill_worker",  # SIGKILL one worker; the server is restarted once it reports unhealthy
    "stop_worker",  # SIGSTOP one worker, SIGCONT after a pause
    "restart_server",  # SIGTERM the group (it drains, then exits), start it again at once
)
DETECTED_KINDS = ("kill_worker", "kill_frontend")
OK, FAILED, WRONG, LOST = "ok", "failed", "wrong_tokens", "lost"


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # a server's name, e.g. "prefill-1"
    pause_s: float  # how long a stop lasts, or how long a killed server stays down


def next_fault(
    rng: random.Random, kinds: list[str], targets: list[str], gap_s: tuple[float, float],
    pause_s: tuple[float, float],
) -> tuple[float, Fault]:  # fmt: skip
    """(seconds to wait before it, the fault): the same sequence for the same seed."""
    gap = rng.uniform(*gap_s)
    fault = Fault(rng.choice(kinds), rng.choice(targets), round(rng.uniform(*pause_s), 2))
    return gap, fault


@dataclass
class RequestRecord:
    client: int
    prompt_index: int
    started_s: float  # since load started
    elapsed_s: float
    status: int | None  # None: no HTTP answer at all
    outcome: str  # OK, FAILED (with a reason), WRONG (tokens differ), LOST (no reason)
    reason: str = ""
    stream: bool = False  # sent with stream: true


def judge(status: int | None, body: Any, expected_ids: list[int]) -> tuple[str, str]:
    """(outcome, reason) of one /generate answer; `body` is the parsed JSON (or text)."""
    if status is None:
        return LOST, f"no answer: {body}"
    if status == 200 and isinstance(body, dict):
        if message := error_message(body):  # a stream's error event, after its 200
            return FAILED, f"200 stream error: {message}"
        finish = (body.get("meta_info") or {}).get("finish_reason") or {}
        if finish.get("type") == "abort":
            return FAILED, f"200 abort: {finish.get('message', '')}"
        if body.get("output_ids") == expected_ids:
            return OK, ""
        return WRONG, f"got {body.get('output_ids')}, expected {expected_ids}"
    message = error_message(body)
    if status >= 400 and message:
        return FAILED, f"{status} {message}"
    return LOST, f"{status} without a reason: {str(body)[:200]}"


def error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "")
    return ""


def reason_key(reason: str) -> str:
    """Failures that differ only in numbers (rooms, ports, ranks, ids) share one key; the
    HTTP status in front is kept."""
    status, _, message = reason.partition(" ")
    message = re.sub(r"[0-9a-f]{32}", "<id>", message)
    message = re.sub(r"\d+(\.\d+)?", "N", message)
    return f"{status} {message}"[:160]


@dataclass
class FaultRecord:
    kind: str
    target: str
    at_s: float  # since load started
    pause_s: float
    # kill_worker: until the server's /health stopped answering 200; kill_frontend: until
    # its workers had exited on their own (None: not within the injector's deadline)
    detected_s: float | None = None
    ready_s: float | None = None  # restarts: fault -> restarted server ready
    rejoined_s: float | None = None  # restarts: ready -> it finished a request of the load
    recovered_s: float | None = None  # fault -> first success of a request sent after it
    slowest_caught_s: float | None = None  # longest request in flight at it or sent just after
    note: str = ""
    skipped: bool = False  # a worker fault on a server with no worker process to hit


CAUGHT_WINDOW_S = 2.0  # requests sent this soon after a fault count as caught by it


def slowest_caught_s(at_s: float, records: list[RequestRecord]) -> float | None:
    """The longest request (any outcome) in flight at the fault or sent within
    CAUGHT_WINDOW_S after it: how long a client caught by the fault waited."""
    caught = [
        r.elapsed_s
        for r in records
        if r.started_s <= at_s + CAUGHT_WINDOW_S and r.started_s + r.elapsed_s >= at_s
    ]
    return max(caught, default=None)


def recovery_s(at_s: float, records: list[RequestRecord]) -> float | None:
    """Seconds from a fault until a request sent after it first succeeded (None: never)."""
    ends = [r.started_s + r.elapsed_s for r in records if r.outcome == OK and r.started_s >= at_s]
    return round(min(ends) - at_s, 3) if ends else None


@dataclass
class Summary:
    num_requests: int
    outcomes: dict[str, int]
    failures_by_reason: dict[str, dict[str, float]]  # key -> {count, max_elapsed_s}
    slowest_failure_s: float
    slowest_ok_s: float
    faults: list[FaultRecord]
    # server -> {pages, rooms, reqs, metrics_pages, unhealthy (1: /health not 200)} after load
    leaks: dict[str, dict[str, int]]
    orphans: list[str]
    drain_s: float | None  # load stop -> every server healthy, at 0 pages and 0 rooms
    problems: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)  # every request, in send order

    @property
    def passed(self) -> bool:
        return not self.problems


def summarize(
    records: list[RequestRecord], faults: list[FaultRecord], leaks: dict[str, dict[str, int]],
    orphans: list[str], drain_s: float | None,
) -> Summary:  # fmt: skip
    for fault in faults:
        fault.recovered_s = recovery_s(fault.at_s, records)
        fault.slowest_caught_s = slowest_caught_s(fault.at_s, records)
    by_reason: dict[str, dict[str, float]] = {}
    for r in records:
        if r.outcome == FAILED:
            entry = by_reason.setdefault(reason_key(r.reason), {"count": 0, "max_elapsed_s": 0.0})
            entry["count"] += 1
            entry["max_elapsed_s"] = round(max(entry["max_elapsed_s"], r.elapsed_s), 3)
    failed = [r.elapsed_s for r in records if r.outcome != OK]
    summary = Summary(
        num_requests=len(records),
        outcomes=dict(Counter(r.outcome for r in records)),
        failures_by_reason=dict(sorted(by_reason.items(), key=lambda kv: -kv[1]["count"])),
        slowest_failure_s=round(max(failed, default=0.0), 3),
        slowest_ok_s=round(max((r.elapsed_s for r in records if r.outcome == OK), default=0.0), 3),
        faults=faults,
        leaks=leaks,
        orphans=orphans,
        drain_s=drain_s,
        records=records,
    )
    summary.problems = problems(summary, records)
    return summary


def problems(summary: Summary, records: list[RequestRecord]) -> list[str]:
    """What must never happen: a request without an outcome, wrong tokens, a leak, an orphan."""
    found = [f"{n} requests lost without a reason" for n in [summary.outcomes.get(LOST, 0)] if n]
    found += [f"{n} requests with wrong tokens" for n in [summary.outcomes.get(WRONG, 0)] if n]
    found += [
        f"{name} still holds {v} after load" for name, v in summary.leaks.items() if any(v.values())
    ]
    found += [f"orphan process: {o}" for o in summary.orphans]
    found += [
        f"{f.kind} {f.target} at {f.at_s} s was never detected: {f.note}"
        for f in summary.faults
        if f.kind in DETECTED_KINDS and f.detected_s is None and not f.skipped
    ]
    if not any(r.outcome == OK for r in records):
        found.append("no request succeeded")
    return found  # fmt: skip


def render_text(summary: Summary) -> str:
    lines = [
        f"chaos: {summary.num_requests} requests: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())),
        f"slowest failure: {summary.slowest_failure_s:.2f} s; "
        f"slowest success: {summary.slowest_ok_s:.2f} s; "
        f"drain after load: {summary.drain_s if summary.drain_s is not None else 'never'} s",
        "failures by reason:",
        *[
            f"  {v['count']:5d}  max {v['max_elapsed_s']:7.2f} s  {key}"
            for key, v in summary.failures_by_reason.items()
        ],
        "faults (at, kind, target, pause; detected, ready, rejoined, recovered, slowest"
        " caught request, in s):",
        *[
            f"  {f.at_s:7.1f}  {f.kind:14s} {f.target:10s} {f.pause_s:5.1f}; "
            f"{_num(f.detected_s)} {_num(f.ready_s)} {_num(f.rejoined_s)} {_num(f.recovered_s)} "
            f"{_num(f.slowest_caught_s)}  {f.note}"
            for f in summary.faults
        ],
        "pages/rooms/requests on live servers after load: "
        + ", ".join(
            f"{n} {v['pages']}/{v['rooms']}/{v.get('reqs', 0)}"
            + (" (/health not 200)" if v.get("unhealthy") else "")
            for n, v in summary.leaks.items()
        ),
        f"orphans: {len(summary.orphans)}",
        "PASS" if summary.passed else "FAIL: " + "; ".join(summary.problems),
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else "     -"
