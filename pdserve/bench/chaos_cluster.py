"""The soak's processes: router + prefill + decode servers (and a colocated reference), each a
`cluster.Child` that the injector can kill, freeze and restart on the same ports. Runs in the
chaos process; every process group it ever started is remembered for the orphan check."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from pdserve.bench import proc_tree
from pdserve.cluster import Child, ClusterConfig, server_argv, stop_all, wait_ready
from pdserve.netaddr import http_url
from pdserve.procs import free_port

OK_FINISHES = ("length", "stop")


class Node:
    """One server or the router: fixed command line and ports, a process that comes and goes."""

    def __init__(self, name: str, role: str, argv: list[str], url: str, ready_paths: list[str]):
        self.name, self.role, self.argv, self.url = name, role, argv, url
        self.ready_paths = ready_paths
        self.child: Child | None = None
        self.pgids: set[int] = set()  # one per start (start_new_session: pgid == pid)
        self.echo = False

    def start(self) -> None:
        self.child = Child(self.name, self.argv, self.url, self.ready_paths, echo=self.echo)
        self.child.start()
        assert self.child.proc is not None
        self.pgids.add(self.child.proc.pid)
        threading.Thread(target=self.child.echo_output, daemon=True).start()

    @property
    def pid(self) -> int:
        assert self.child is not None and self.child.proc is not None
        return self.child.proc.pid

    def wait_ready(self, timeout_s: float) -> None:
        assert self.child is not None
        wait_ready([self.child], time.monotonic() + timeout_s, threading.Event())

    def alive(self) -> bool:
        return self.child is not None and self.child.exit_code() is None

    def exit_code(self) -> int | None:
        return None if self.child is None else self.child.exit_code()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.child is not None:
            stop_all([self.child], timeout_s)

    def signal_group(self, sig: signal.Signals) -> None:
        assert self.child is not None
        self.child.signal_group(sig)

    def worker_pids(self) -> list[int]:
        return proc_tree.worker_pids(self.pid)

    def tail(self) -> str:
        return "\n".join(self.child.tail) if self.child else ""


def plan_nodes(
    c: ClusterConfig, num_prefill: int, num_decode: int, router_args: list[str]
) -> list[Node]:
    """Prefill servers, decode servers, then the router over all of them."""
    nodes: list[Node] = []
    router_argv = [sys.executable, "-m", "pdserve", "router", "--host", c.host]
    for i in range(num_prefill):
        port, bootstrap_port = free_port(c.host), free_port(c.host)
        url = http_url(c.host, port)
        argv = server_argv(c, "prefill", port, c.prefill_dp)
        argv += ["--bootstrap-port", str(bootstrap_port)]
        ready = ["/health", http_url(c.host, bootstrap_port) + "/route"]
        nodes.append(Node(f"prefill-{i}", "prefill", argv, url, ready))
        router_argv += ["--prefill", url, str(bootstrap_port)]
    for i in range(num_decode):
        port = free_port(c.host)
        argv = server_argv(c, "decode", port, c.decode_dp)
        nodes.append(Node(f"decode-{i}", "decode", argv, http_url(c.host, port), ["/health"]))
        router_argv += ["--decode", http_url(c.host, port)]
    port = free_port(c.host)
    router_argv += ["--port", str(port), "--policy", c.policy, *router_args]
    nodes.append(Node("router", "router", router_argv, http_url(c.host, port), ["/readiness"]))
    return nodes


def reference_node(c: ClusterConfig) -> Node:
    port = free_port(c.host)
    argv = server_argv(c, "colocated", port, 1)
    return Node("reference", "colocated", argv, http_url(c.host, port), ["/health"])


def http(
    method: str, url: str, body: Any = None, timeout_s: float = 10.0
) -> tuple[int | None, Any]:
    """(status, parsed JSON or text); (None, why) when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # refused, reset, timed out, bad status line
        return None, repr(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def http_stream(url: str, body: Any, timeout_s: float) -> tuple[int | None, Any]:
    """POST a streaming request and read its server-sent events to the end: (status, the
    last event, or {"error": ...} from an error event, or the error body); (None, why) when
    nothing answered or the stream broke off with neither `data: [DONE]` nor an error event
    (the router ends a stream whose decode connection failed with the error event alone)."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, last = resp.status, None
            for raw in resp:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return status, last
                event = json.loads(payload)
                if isinstance(event, dict) and "error" in event:
                    last = event  # the stream's own error: kept, [DONE] follows
                elif not (isinstance(last, dict) and "error" in last):
                    last = event
            if isinstance(last, dict) and "error" in last:  # the router's, decode gone
                return status, last
            return None, f"stream ended without [DONE] after {str(last)[:200]}"
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")
    except (OSError, ValueError) as exc:  # refused, reset, timed out, bad event
        return None, repr(exc)


def live_load(url: str, max_kv_peers: int | None = None) -> dict[str, int] | None:
    """Pages used, rooms in flight and requests held (queued or running in a worker, or
    awaited by the front end) on the live ranks of a server (None: no answer); with
    `max_kv_peers` (decode: the prefill workers there are), the KV peers its ranks dial past
    that many (endpoints of prefill workers that died or restarted on other ports)."""
    status, load = http("GET", url + "/get_load")
    if status != 200 or not isinstance(load, list):
        return None
    live = [rank for rank in load if rank.get("alive", True)]
    counts = {
        "pages": sum(rank["num_used_pages"] for rank in live),
        "rooms": sum(rank.get("num_disagg_rooms", 0) for rank in live),
        "reqs": sum(rank.get("num_reqs", 0) + rank.get("num_inflight_reqs", 0) for rank in live),
    }
    if max_kv_peers is not None:
        peers = [rank.get("num_kv_peers", 0) for rank in live]
        counts["stale_kv_peers"] = sum(max(0, n - max_kv_peers) for n in peers)
    return counts


def pages_in_metrics(url: str) -> int | None:
    """Sum of the kv_pages_used gauge in /metrics: the second source, checked against
    /get_load (None: no answer)."""
    return _metric_sum(url, "pdserve_kv_pages_used")


def finished_ok(url: str) -> int | None:
    """Requests the server finished normally (length or stop), from /metrics."""
    return _metric_sum(url, "pdserve_requests_total", OK_FINISHES)


def _metric_sum(url: str, name: str, statuses: tuple[str, ...] | None = None) -> int | None:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http("GET", url + "/metrics")
    if status != 200 or not isinstance(text, str):
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (
                statuses is None or sample.labels.get("status") in statuses
            ):
                total += sample.value
    return int(total)
