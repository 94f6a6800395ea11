"""Router overhead benchmark (a script, run by hand): the latency that `pdserve router` and
SGLang's `sglang-router` add over calling prefill + decode directly with the same bodies, at
several concurrencies, plus time to first streamed token. All on loopback, same servers,
same run, modes interleaved round by round so drift hits each alike.

    python -m pdserve.bench.bench_router --model-path tiny-random
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from pdserve.cluster import Child, stop_all, wait_ready
from pdserve.procs import free_port
from pdserve.router.merge import SSEBuffer

try:  # the same event loop for every mode's client, and the router's own
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop

Call = Callable[[aiohttp.ClientSession, dict], Awaitable[tuple[float, float | None]]]
ROOM_LIMIT = 1 << 63


@dataclass
class Setup:
    prefill_url: str
    decode_url: str
    bootstrap_port: int
    routers: dict[str, str] = field(default_factory=dict)  # mode -> URL
    pids: dict[str, int] = field(default_factory=dict)  # mode -> router process id


def cpu_s(pid: int) -> float:
    """CPU seconds of a process's live threads, to the nanosecond (Linux schedstat; the
    clock-tick counts of /proc/PID/stat are too coarse for rounds of a few requests)."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended just now
    return total_ns / 1e9


async def _read(resp: aiohttp.ClientResponse, stream: bool, started: float) -> float | None:
    """Read the whole answer; for a stream, the time its first event arrived."""
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
    if not stream:
        await resp.read()
        return None
    first_s, buf = None, SSEBuffer()
    async for data in resp.content.iter_any():
        if first_s is None and buf.feed(data):
            first_s = time.perf_counter() - started
    return first_s


def direct_call(setup: Setup) -> Call:
    """What a router must do at the least: both legs at once; the answer is decode's. Like a
    router, it answers without waiting for prefill's body, which is read in the background."""
    background: set[asyncio.Task] = set()

    async def prefill_leg(session: aiohttp.ClientSession, body: dict, stream: bool) -> None:
        async with session.post(setup.prefill_url + "/generate", json=body) as resp:
            await _read(resp, stream, time.perf_counter())

    async def call(session: aiohttp.ClientSession, body: dict) -> tuple[float, float | None]:
        room = random.randrange(ROOM_LIMIT)
        body = dict(
            body,
            bootstrap_host="127.0.0.1",
            bootstrap_port=setup.bootstrap_port,
            bootstrap_room=room,
        )
        stream = body.get("stream", False)
        started = time.perf_counter()
        task = asyncio.create_task(prefill_leg(session, body, stream))
        background.add(task)
        task.add_done_callback(background.discard)
        async with session.post(setup.decode_url + "/generate", json=body) as resp:
            first_s = await _read(resp, stream, started)
        return time.perf_counter() - started, first_s

    async def drain() -> None:
        await asyncio.gather(*background)

    call.drain = drain  # type: ignore[attr-defined]
    return call


def router_call(url: str) -> Call:
    async def call(session: aiohttp.ClientSession, body: dict) -> tuple[float, float | None]:
        started = time.perf_counter()
        async with session.post(url + "/generate", json=body) as resp:
            first_s = await _read(resp, body.get("stream", False), started)
        return time.perf_counter() - started, first_s

    return call


async def run_load(
    call: Call, session: aiohttp.ClientSession, body: dict, concurrency: int, num_requests: int
) -> list[tuple]:
    results: list[tuple] = []
    remaining = iter(range(num_requests))

    async def client() -> None:
        for _ in remaining:
            results.append(await call(session, body))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    if hasattr(call, "drain"):
        await call.drain()
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    setup: Setup,
    modes: dict[str, Call],
    body: dict,
    concurrency: int,
    num_requests: int,
    round_size: int,
    min_rounds: int,
) -> tuple[dict[str, list[tuple]], dict[str, float]]:
    """Samples per mode, and each router's CPU seconds per request. Each mode has its own
    client session for the whole measurement, so keep-alive connections are reused from
    round to round alike for every mode; a warm-up round first opens `concurrency` of them."""
    samples: dict[str, list[tuple]] = {mode: [] for mode in modes}
    cpu: dict[str, float] = dict.fromkeys(setup.pids, 0.0)
    names = list(modes)
    timeout = aiohttp.ClientTimeout(total=120)
    sessions = {
        mode: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        for mode in modes
    }
    try:
        for mode in names:
            await run_load(modes[mode], sessions[mode], body, concurrency, 2 * concurrency)
        # Short rounds: drift of the box hits every mode alike. Yet `round_size` requests
        # per client, so that the ramp at each round's start and end is a small share.
        per_round = round_size * concurrency
        for r in range(max(min_rounds, num_requests // per_round)):
            for mode in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                pid = setup.pids.get(mode)
                before = cpu_s(pid) if pid else 0.0
                samples[mode] += await run_load(
                    modes[mode], sessions[mode], body, concurrency, per_round
                )
                if pid:
                    cpu[mode] += cpu_s(pid) - before
    finally:
        for session in sessions.values():
            await session.close()
    return samples, {mode: cpu[mode] / len(samples[mode]) for mode in cpu}


def report(title: str, samples: dict[str, list[tuple]], cpu: dict[str, float], column: int) -> None:
    base = [s[column] for s in samples["direct"]]
    b50, b99 = percentile(base, 0.5), percentile(base, 0.99)
    print(f"\n{title}")
    print(
        f"{'mode':<16}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}"
        f"{'router CPU/req':>16}"
    )
    for mode, rows in samples.items():
        values = [row[column] for row in rows]
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        line = f"{mode:<16}{len(values):>6}{p50 * 1e3:>9.2f}{p99 * 1e3:>9.2f}"
        if mode != "direct":
            line += f"{(p50 - b50) * 1e3:>+11.2f}{(p99 - b99) * 1e3:>+11.2f}"
            line += f"{cpu[mode] * 1e3:>13.3f} ms"
        print(line)


def start_cluster(args: argparse.Namespace) -> tuple[Setup, list[Child]]:
    """`pdserve up`'s three children (quiet) plus sglang-router on the same servers."""
    from pdserve.cluster import ClusterConfig, plan
    from pdserve.engine.loader import resolve_model_dir

    # A local directory: sglang-router would otherwise try to download a tokenizer.
    bootstrap_port = free_port("127.0.0.1")
    config = ClusterConfig(
        model_path=resolve_model_dir(args.model_path),
        bootstrap_port=bootstrap_port,
        torch_threads=args.torch_threads,
        server_args="--log-level warning",
    )
    children = plan(config)
    prefill, decode, ours = children
    ours.name = "pdserve-router"
    port, prometheus_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    flags = (
        f"--pd-disaggregation --prefill {prefill.url} {bootstrap_port} --decode {decode.url} "
        f"--host 127.0.0.1 --port {port} --prometheus-host 127.0.0.1 --prometheus-port "
        f"{prometheus_port} --policy round_robin --log-level warn"
    )
    sglang = [sys.executable, "-m", "sglang_router.launch_router", *flags.split()]
    children.append(Child("sglang-router", sglang, f"http://127.0.0.1:{port}", ["/readiness"]))
    for child in children:
        child.echo = False
    routers = {"pdserve-router": ours.url, "sglang-router": children[-1].url}
    return Setup(prefill.url, decode.url, bootstrap_port, routers), children


async def run_all(args: argparse.Namespace, setup: Setup) -> None:
    body = {
        "input_ids": [random.randrange(3, 500) for _ in range(args.prompt_len)],
        "sampling_params": {
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    }
    modes = {"direct": direct_call(setup)} | {
        name: router_call(url) for name, url in setup.routers.items()
    }
    for concurrency in args.concurrency:
        samples, cpu = await measure(
            setup, modes, body, concurrency, args.num_requests, args.round_size, args.min_rounds
        )
        title = f"non-streamed /generate, {concurrency} concurrent clients: whole request"
        report(title, samples, cpu, 0)
    stream = {**body, "stream": True}
    samples, cpu = await measure(
        setup, modes, stream, 1, args.num_requests, args.round_size, args.min_rounds
    )
    report("streamed /generate, 1 client: time to first token", samples, cpu, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="tiny-random")
    parser.add_argument(
        "--num-requests", type=int, default=960, help="per mode and concurrency, at least"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--round-size",
        type=int,
        default=16,
        help="requests per client in one round of a mode (modes take turns round by round)",
    )
    parser.add_argument("--min-rounds", type=int, default=6, help="per mode and concurrency")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    setup, children = start_cluster(args)
    try:
        for child in children:
            child.start()
        for child in children:
            threading.Thread(target=child.echo_output, daemon=True).start()
        wait_ready(children, time.monotonic() + args.ready_timeout_s, threading.Event())
        setup.pids = {c.name: c.proc.pid for c in children[2:] if c.proc}
        run_loop(run_all(args, setup))
        return 0
    finally:
        stop_all(children, 15.0)


if __name__ == "__main__":
    sys.exit(main())
