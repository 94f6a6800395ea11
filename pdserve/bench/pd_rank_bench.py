"""TTFT of rooms routed off their home worker (docs/protocol.md sections 4 and 10).

`python -m pdserve.bench.pd_rank_bench`: one decode server and two prefill servers (dp 2
each) on loopback. On the `--rank-mismatch forward` server, `aligned` rooms are routed to
their home worker (fast path) and `divergent` rooms to the other one (page list redirected);
`query` rooms are routed off home on a FORCE server (registered, queried). The cells run
interleaved at each concurrency; the table gives TTFT p50/p99 against aligned rooms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp

from pdserve.procs import free_port


class Proc:
    """A `python -m pdserve serve ...` child in its own process group."""

    def __init__(
        self,
        args: list[str],
        ready_urls: list[str],
        timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "serve", *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        for url in ready_urls:
            while not _ok(url):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server {args} did not become ready ({url})")
                time.sleep(0.1)  # readiness polling with a deadline

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


DP_SIZE = 2


async def _one(session, cell, decode_url, prompt_len) -> float:
    prefill_url, bootstrap_port, divergent = cell
    room = random.randrange(2**63)
    body = {
        "input_ids": [random.randrange(3, 250) for _ in range(prompt_len)],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": room,
    }
    # The prefill leg names its worker, as an external router would; decode's body does not.
    rank = (room + divergent) % DP_SIZE
    start = time.perf_counter()

    async def post(url, extra=None):
        async with session.post(url + "/generate", json=dict(body, **(extra or {}))) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status}")

    # The decode answer with max_new_tokens=1 arrives with the first token: its latency is TTFT.
    decode = asyncio.create_task(post(decode_url))
    await asyncio.gather(post(prefill_url, {"routed_dp_rank": rank}), decode)
    return time.perf_counter() - start


async def _measure(
    cells, decode_url, concurrency, num_requests, prompt_len
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in cells}
    async with aiohttp.ClientSession() as session:
        for _ in range(max(1, num_requests // concurrency)):
            for name, cell in cells.items():  # interleaved: same conditions
                batch = [_one(session, cell, decode_url, prompt_len) for _ in range(concurrency)]
                samples[name] += await asyncio.gather(*batch)
    return samples


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="tiny-random")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 32])
    args = parser.parse_args(argv)
    common = ["--model-path", args.model_path, "--host", "127.0.0.1", "--dp-size", str(DP_SIZE)]
    procs: list[Proc] = []
    try:
        servers = (
            ("forward", ["--rank-mismatch", "forward"]),
            ("force", ["--force-query-prefill-dp-rank"]),
        )
        urls = {}
        for name, extra in servers:
            port, bport = free_port(), free_port()
            procs.append(
                Proc(
                    [
                        *common,
                        "--mode",
                        "prefill",
                        "--port",
                        str(port),
                        "--bootstrap-port",
                        str(bport),
                        *extra,
                    ],
                    [f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{bport}/route"],
                )
            )
            urls[name] = (f"http://127.0.0.1:{port}", bport)
        cells = {
            "aligned": (*urls["forward"], 0),
            "divergent": (*urls["forward"], 1),
            "query": (*urls["force"], 1),
        }
        dport = free_port()
        procs.append(
            Proc(
                [*common, "--mode", "decode", "--port", str(dport)],
                [f"http://127.0.0.1:{dport}/health"],
            )
        )
        decode_url = f"http://127.0.0.1:{dport}"
        asyncio.run(_measure(cells, decode_url, 4, 8, args.prompt_len))  # warm-up
        print(
            f"TTFT, prompt {args.prompt_len} tokens, {args.model_path}, prefill dp 2 -> decode dp 2"
        )
        print(
            f"{'concurrency':>11} {'rooms':>10} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'p50 - aligned ms':>17} {'p50 ratio':>10}"
        )
        for conc in args.concurrency:
            samples = asyncio.run(
                _measure(cells, decode_url, conc, args.num_requests, args.prompt_len)
            )
            base = _pct(samples["aligned"], 0.5)
            for name, values in samples.items():
                p50 = _pct(values, 0.5)
                print(
                    f"{conc:>11} {name:>10} {p50:>8.2f} {_pct(values, 0.99):>8.2f} "
                    f"{p50 - base:>17.2f} {p50 / base:>10.2f}"
                )
    finally:
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    main()
