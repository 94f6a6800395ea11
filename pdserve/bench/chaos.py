"""Chaos soak: `python -m pdserve.bench.chaos`. Starts router + prefill + decode servers, drives
bounded load through the router while seeded faults kill, freeze and restart servers and
workers, then checks every answer against a colocated reference (temperature 0), that pages
and rooms return to zero, and that no process is left behind. Writes a JSON and text report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.bench import proc_tree
from pdserve.bench.chaos_cluster import (
    Node,
    http,
    http_stream,
    live_load,
    pages_in_metrics,
    plan_nodes,
    reference_node,
)
from pdserve.bench.chaos_core import (
    FAULT_KINDS,
    FaultRecord,
    RequestRecord,
    Summary,
    judge,
    next_fault,
    render_text,
    summarize,
)
from pdserve.bench.chaos_faults import Injector
from pdserve.cluster import ClusterConfig
from pdserve.config import add_arguments, check, from_args, opt

POLL_S = 0.1
ORPHAN_GRACE_S = 5.0  # after the last stop, before a process still running is an orphan
FAILURE_BACKOFF_S = 0.2  # a client's pause after a failed request, so errors don't spin


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = opt(300.0, "how long the load runs (faults are injected meanwhile)")
    clients: int = opt(4, "concurrent clients, each one request at a time")
    seed: int = opt(0, "seed of the prompts, the clients' choices and the faults")
    num_prefill: int = opt(2, "prefill servers")
    num_decode: int = opt(2, "decode servers")
    prefill_dp: int = opt(2, "DP workers per prefill server")
    decode_dp: int = opt(2, "DP workers per decode server")
    faults: list[str] = opt(
        list(FAULT_KINDS), "fault kinds to draw from", choices=list(FAULT_KINDS)
    )
    min_gap_s: float = opt(3.0, "shortest wait between the end of one fault and the next")
    max_gap_s: float = opt(10.0, "longest wait between faults")
    min_pause_s: float = opt(1.0, "shortest SIGSTOP, or downtime before a restart")
    max_pause_s: float = opt(4.0, "longest SIGSTOP, or downtime before a restart")
    num_prompts: int = opt(24, "distinct prompts (token ids) the clients draw from")
    max_new_tokens: int = opt(8, "tokens generated per request")
    stream_fraction: float = opt(0.0, "share of requests sent with stream: true (0..1)")
    request_timeout_s: float = opt(120.0, "client deadline of one request: past it, it is lost")
    ready_timeout_s: float = opt(300.0, "deadline for a (re)started process to be ready")
    drain_timeout_s: float = opt(40.0, "deadline for pages and rooms to return to 0 after load")
    model_path: str = opt("tiny-random", "model of every server", flag="--model-path")
    torch_threads: int = opt(1, "torch threads per worker")
    server_args: str = opt("", "more flags for every server, one string")
    router_args: str = opt("", "more flags for the router, one string")
    json_out: str | None = opt(None, "write the JSON report here")
    echo: bool = opt(False, "echo every process's output, prefixed with its name")

    def __post_init__(self) -> None:
        check(self.duration_s > 0 and self.clients >= 1, "--duration-s > 0, --clients >= 1")
        check(self.num_prefill >= 1 and self.num_decode >= 1, "one prefill and decode at least")
        check(0 <= self.min_gap_s <= self.max_gap_s, "0 <= --min-gap-s <= --max-gap-s")
        check(0 <= self.min_pause_s <= self.max_pause_s, "0 <= --min-pause-s <= --max-pause-s")
        check(self.num_prompts >= 1 and self.max_new_tokens >= 1, "prompts and tokens >= 1")
        check(0 <= self.stream_fraction <= 1, "0 <= --stream-fraction <= 1")

    def cluster(self) -> ClusterConfig:
        return ClusterConfig(
            prefill_dp=self.prefill_dp, decode_dp=self.decode_dp, model_path=self.model_path,
            torch_threads=self.torch_threads, server_args=self.server_args,
        )  # fmt: skip


def make_prompts(rng: random.Random, count: int) -> list[list[int]]:
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(4, 80))] for _ in range(count)]


def body_of(prompt: list[int], c: ChaosConfig) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": c.max_new_tokens, "temperature": 0},
    }


def expected_outputs(ref: Node, prompts: list[list[int]], c: ChaosConfig) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        status, body = http("POST", ref.url + "/generate", body_of(prompt, c), c.request_timeout_s)
        if status != 200:
            raise RuntimeError(f"the reference server failed: {status} {body}")
        outputs.append(body["output_ids"])
    return outputs


class Load:
    """Clients that send /generate through the router until `until_s`, recording each answer."""

    def __init__(
        self, c: ChaosConfig, router_url: str, prompts: list[list[int]],
        expected: list[list[int]], now_s: Callable[[], float],
    ) -> None:  # fmt: skip
        self.c, self.url, self.prompts, self.expected = c, router_url, prompts, expected
        self.now_s = now_s
        self.records: list[RequestRecord] = []
        self.lock = threading.Lock()

    def client(self, index: int, until_s: float) -> None:
        rng = random.Random(f"{self.c.seed}-client-{index}")
        while self.now_s() < until_s:
            i = rng.randrange(len(self.prompts))
            stream = rng.random() < self.c.stream_fraction
            started = self.now_s()
            body = body_of(self.prompts[i], self.c)
            if stream:
                status, answer = http_stream(self.url + "/generate", body, self.c.request_timeout_s)
            else:
                status, answer = http(
                    "POST", self.url + "/generate", body, self.c.request_timeout_s
                )
            outcome, reason = judge(status, answer, self.expected[i])
            record = RequestRecord(
                index, i, round(started, 3), round(self.now_s() - started, 3), status, outcome,
                reason, stream,
            )  # fmt: skip
            with self.lock:
                self.records.append(record)
            if outcome != "ok":
                time.sleep(FAILURE_BACKOFF_S)


def inject_until(
    injector: Injector, c: ChaosConfig, targets: list[str], until_s: float,
    now_s: Callable[[], float],
) -> list[FaultRecord]:  # fmt: skip
    rng = random.Random(f"{c.seed}-faults")
    faults: list[FaultRecord] = []
    while True:
        gap, fault = next_fault(
            rng, c.faults, targets, (c.min_gap_s, c.max_gap_s), (c.min_pause_s, c.max_pause_s)
        )
        if now_s() + gap >= until_s:
            return faults
        time.sleep(gap)
        print(f"chaos: {now_s():7.1f} s  {fault.kind} {fault.target}", flush=True)
        faults.append(injector.apply(fault))


def drain(
    servers: list[Node], timeout_s: float, max_kv_peers: int
) -> tuple[dict[str, dict[str, int]], float | None]:
    """Wait until every server is healthy and at 0 pages, 0 rooms and 0 requests, and each
    decode rank dials at most `max_kv_peers` prefill workers; the last values and the time
    taken. Healthy first: the counts leave out a rank `/get_load` shows down (`alive`
    false), and a worker resumed from a freeze is down until its first beat arrives, with
    whatever it still holds."""
    start = time.monotonic()
    while True:
        leaks = {
            n.name: live_load(n.url, max_kv_peers if n.role == "decode" else None)
            or {"pages": -1, "rooms": -1, "reqs": -1}
            for n in servers
        }
        for n in servers:
            leaks[n.name]["metrics_pages"] = pages_in_metrics(n.url) or 0
            leaks[n.name]["unhealthy"] = int(http("GET", n.url + "/health")[0] != 200)
        if not any(v for leak in leaks.values() for v in leak.values()):
            return leaks, round(time.monotonic() - start, 3)
        if time.monotonic() - start > timeout_s:
            return leaks, None
        time.sleep(POLL_S)


def run(c: ChaosConfig) -> Summary:
    nodes = plan_nodes(c.cluster(), c.num_prefill, c.num_decode, shlex.split(c.router_args))
    ref = reference_node(c.cluster())
    everything = [ref, *nodes]
    for node in everything:
        node.echo = c.echo
    try:
        for node in everything:  # every start before any client thread (preexec_fn safety)
            node.start()
        for node in everything:
            node.wait_ready(c.ready_timeout_s)
        prompts = make_prompts(random.Random(f"{c.seed}-prompts"), c.num_prompts)
        expected = expected_outputs(ref, prompts, c)
        ref.stop()
        return soak(c, nodes, prompts, expected)
    finally:
        for node in reversed(everything):
            node.stop()


def soak(
    c: ChaosConfig, nodes: list[Node], prompts: list[list[int]], expected: list[list[int]]
) -> Summary:
    t0 = time.monotonic()

    def now_s() -> float:
        return time.monotonic() - t0

    servers = [n for n in nodes if n.role != "router"]
    load = Load(c, nodes[-1].url, prompts, expected, now_s)
    load_over = threading.Event()
    injector = Injector(
        {n.name: n for n in servers}, random.Random(f"{c.seed}-workers"), now_s,
        c.ready_timeout_s, rejoin_timeout_s=30.0, load_over=load_over,
    )  # fmt: skip
    with ThreadPoolExecutor(c.clients) as pool:
        futures = [pool.submit(load.client, i, c.duration_s) for i in range(c.clients)]
        for future in futures:  # a restart near the end stops waiting to rejoin the load
            future.add_done_callback(lambda _: all(f.done() for f in futures) and load_over.set())
        try:
            faults = inject_until(injector, c, [n.name for n in servers], c.duration_s, now_s)
        finally:
            for future in futures:
                future.result()
            load_over.set()
    leaks, drain_s = drain(servers, c.drain_timeout_s, c.num_prefill * c.prefill_dp)
    pgids = {pgid for n in nodes for pgid in n.pgids}
    for node in reversed(nodes):
        node.stop()
    orphans = [f"pid {p.pid} ({p.cmdline[:80]})" for p in survivors(pgids, ORPHAN_GRACE_S)]
    return summarize(sorted(load.records, key=lambda r: r.started_s), faults, leaks, orphans,
                     drain_s)  # fmt: skip


def survivors(pgids: set[int], grace_s: float) -> list[proc_tree.ProcInfo]:
    """Processes of these groups still running after `grace_s`: a SIGKILLed process
    lingers in /proc for a moment before it is gone."""
    deadline = time.monotonic() + grace_s
    while (left := proc_tree.live_members(pgids)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return left


def report_json(summary: Summary, c: ChaosConfig) -> dict:
    return {
        "config": dataclasses.asdict(c),
        "passed": summary.passed,
        **dataclasses.asdict(summary),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.chaos", description=__doc__)
    add_arguments(parser, ChaosConfig)
    try:
        c = from_args(ChaosConfig, parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    summary = run(c)
    if c.json_out:
        with open(c.json_out, "w") as f:
            json.dump(report_json(summary, c), f, indent=1)
    print(render_text(summary), flush=True)
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
