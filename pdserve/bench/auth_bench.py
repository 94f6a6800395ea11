"""TTFT cost of authentication: the same PD requests through a pair of servers without
credentials and a pair with `--api-key` and `--disagg-secret`, interleaved, at 1 client.

`python -m pdserve.bench.auth_bench`: starts both pairs (prefill dp 1 -> decode dp 1) on
loopback; the table gives TTFT p50/p99 of each and the p50 difference.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp

from pdserve.auth import bearer_header
from pdserve.bench.pd_rank_bench import Proc, _pct
from pdserve.procs import free_port

API_KEY = "bench-api-key"
SECRET = "bench-disagg-secret"


def _pair(model_path: str, env: dict[str, str], procs: list[Proc]) -> tuple[str, int, str]:
    common = ["--model-path", model_path, "--host", "127.0.0.1"]
    port, bport, dport = free_port(), free_port(), free_port()
    procs.append(
        Proc(
            [*common, "--mode", "prefill", "--port", str(port), "--bootstrap-port", str(bport)],
            [f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{bport}/route"],
            env=env,
        )
    )
    procs.append(
        Proc(
            [*common, "--mode", "decode", "--port", str(dport)],
            [f"http://127.0.0.1:{dport}/health"],
            env=env,
        )
    )
    return f"http://127.0.0.1:{port}", bport, f"http://127.0.0.1:{dport}"


async def _one(session, prefill_url: str, decode_url: str, bootstrap_port: int, prompt_len: int):
    """One PD request (both legs at once, as a router sends them); its TTFT in seconds: the
    decode answer of max_new_tokens=1 arrives with the first token."""
    body = {
        "input_ids": [random.randrange(3, 250) for _ in range(prompt_len)],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": random.randrange(2**63),
    }

    async def post(url: str) -> None:
        async with session.post(url + "/generate", json=body) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status}")

    start = time.perf_counter()
    await asyncio.gather(post(prefill_url), post(decode_url))
    return time.perf_counter() - start


async def _measure(cells: dict, num_requests: int, prompt_len: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in cells}
    sessions = {
        name: aiohttp.ClientSession(headers=bearer_header(key)) for name, (*_, key) in cells.items()
    }
    try:
        for i in range(num_requests):
            names = list(cells) if i % 2 == 0 else list(reversed(cells))  # no order bias
            for name in names:
                prefill, bport, decode, _ = cells[name]
                samples[name].append(await _one(sessions[name], prefill, decode, bport, prompt_len))
    finally:
        for session in sessions.values():
            await session.close()
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="tiny-random")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, default=64)
    args = parser.parse_args(argv)
    procs: list[Proc] = []
    try:
        secured = {"PDSERVE_API_KEY": API_KEY, "PDSERVE_DISAGG_SECRET": SECRET}
        cells = {
            "plain": (*_pair(args.model_path, {}, procs), None),
            "key+secret": (*_pair(args.model_path, secured, procs), API_KEY),
        }
        asyncio.run(_measure(cells, 8, args.prompt_len))  # warm-up, and the KV handshakes
        started = time.monotonic()
        samples = asyncio.run(_measure(cells, args.num_requests, args.prompt_len))
        print(
            f"TTFT at 1 client, prompt {args.prompt_len} tokens, {args.model_path}, "
            f"{args.num_requests} requests each, interleaved ({time.monotonic() - started:.0f} s)"
        )
        print(f"{'servers':>12} {'p50 ms':>8} {'p99 ms':>8}")
        for name, values in samples.items():
            print(f"{name:>12} {_pct(values, 0.5):>8.2f} {_pct(values, 0.99):>8.2f}")
        added = _pct(samples["key+secret"], 0.5) - _pct(samples["plain"], 0.5)
        print(f"added p50 TTFT: {added:+.3f} ms")
    finally:
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    main()
