"""KV transfer over the cuda_ipc transport between two processes on one GPU, against the
device copy bandwidth measured in the same run (payload bytes per second for both).

Run: `python -m pdserve.bench.gpu_transfer_bench [--sizes-mib 16 64 256 1024]`. This process
is the decode side (it grants pages and receives); a spawned process is the prefill side.
Pages are scattered in both pools (random page ids), as a running server's are.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pdserve.config import add_arguments, check, from_args, opt
from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import Inbound, KVReceived
from pdserve.disagg.transfer.cuda_ipc import CudaIpcTransport

MIB = 1 << 20
# One page of the Llama-3-8B shape: 32 layers, K and V, 16 tokens, 8 KV heads, 128 dims, bf16.
PAGE_SHAPE = (32, 2, 16, 8, 128)
TIMEOUT_S = 120.0
COPY_VARIANTS = [(2048, 4), (1024, 4), (4096, 8), (8192, 8), (512, 2)]  # (int64 words, warps)


@dataclass(frozen=True)
class TransferBenchConfig:
    sizes_mib: list[int] = opt([16, 64, 256, 1024], "payload per transfer, MiB")
    rounds: int = opt(10, "timed transfers per size (one at a time)")
    in_flight: int = opt(8, "transfers in flight in the pipelined measurement")
    pool_mib: int = opt(2048, "KV pool of each side, MiB")
    out_dir: str | None = opt(None, "write gpu_transfer.json here")

    def __post_init__(self) -> None:
        check(all(0 < s <= self.pool_mib for s in self.sizes_mib), "sizes must fit the pool")
        check(self.rounds > 0 and self.in_flight > 0, "--rounds and --in-flight must be > 0")


def make_pool(num_pages: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (num_pages, *PAGE_SHAPE)
    return torch.randint(-30000, 30000, shape, generator=gen, device="cuda", dtype=torch.int16)


def src_pages_for(room: int, num_pages: int, pool_pages: int) -> list[int]:
    """Which prefill pages hold `room` (both processes compute the same answer)."""
    return np.random.default_rng(room).permutation(pool_pages)[:num_pages].tolist()


def sender_main(conn, pool_pages: int, seed: int) -> None:
    """Prefill side: answer every PageList with send_kv from the room's source pages."""
    pool = make_pool(pool_pages, seed)
    torch.cuda.synchronize()
    transport = CudaIpcTransport(pool, listen_host="127.0.0.1")
    conn.send(transport.endpoint)
    deadline = time.monotonic() + 10 * TIMEOUT_S
    try:
        while time.monotonic() < deadline and not conn.poll():
            for event in transport.poll(5):
                if isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                    msg = event.msg
                    src = src_pages_for(msg.room, len(msg.dst_page_ids), pool_pages)
                    then = m.RoomStatus(room=msg.room, ok=True)
                    transport.send_kv(event.peer, msg.room, src, msg.dst_page_ids, then)
    finally:
        transport.close()


class Receiver:
    """Decode side: grant pages for rooms and wait until their KV is in the pool."""

    def __init__(self, pool: torch.Tensor, endpoint: str) -> None:
        self.pool = pool
        self.transport = CudaIpcTransport(pool, listen_host=None)
        self.peer = self.transport.connect(endpoint)
        self.next_room = 1
        self.rng = np.random.default_rng(0)

    def transfer(self, num_pages: int, num_rooms: int) -> list[tuple[int, list[int]]]:
        """Move num_rooms rooms of num_pages pages each, all in flight at once."""
        rooms = []
        for _ in range(num_rooms):
            dst = self.rng.permutation(self.pool.shape[0])[:num_pages].tolist()
            rooms.append((self.next_room, dst))
            page_list = m.PageList(room=self.next_room, dst_page_ids=dst, prompt_len=1)
            self.transport.send(self.peer, page_list)
            self.next_room += 1
        waiting = {room for room, _ in rooms}
        deadline = time.monotonic() + TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rooms {sorted(waiting)} never arrived")
            for event in self.transport.poll(5):
                if isinstance(event, KVReceived):
                    assert event.complete, f"room {event.room}: {event}"
                    waiting.discard(event.room)
        torch.cuda.synchronize()  # the copies are queued on this stream; wait for the bytes
        return rooms


def timed_s(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def copy_gbps(nbytes: int) -> float:
    """Payload bytes per second of one device-to-device copy_ of nbytes (median of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)

    def once() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    once()
    return nbytes / statistics.median(timed_s(once) for _ in range(10)) / 1e9


def kernel_gbps(rx: Receiver, num_pages: int) -> dict[str, float]:
    """The page-copy kernel alone, mapped prefill pool -> this pool, per (block, warps)."""
    from pdserve.bench.gpu_bench import median_event_ms
    from pdserve.engine.gpu.copy_pages import copy_pages

    src_pool = rx.transport.peer_pool(rx.peer)
    dst_pool = rx.pool.view(torch.uint8).view(rx.pool.shape[0], -1)
    src = torch.tensor(src_pages_for(0, num_pages, src_pool.shape[0]), device="cuda")
    dst = torch.tensor(rx.rng.permutation(dst_pool.shape[0])[:num_pages], device="cuda")
    nbytes = num_pages * dst_pool.shape[1]
    out = {}
    for block, warps in COPY_VARIANTS:

        def run(block: int = block, warps: int = warps) -> None:
            copy_pages(src_pool, dst_pool, src, dst, block, warps)

        ms = median_event_ms(run, 10)
        out[f"{block}x{warps}"] = nbytes / ms / 1e6
    return out


def measure_size(rx: Receiver, size_mib: int, cfg: TransferBenchConfig, sender_pool) -> dict:
    page_nbytes = rx.transport.page_nbytes
    num_pages = max(1, size_mib * MIB // page_nbytes)
    nbytes = num_pages * page_nbytes
    rx.transfer(num_pages, 1)  # warm-up (first copy compiles the kernel)
    serial = [timed_s(lambda: rx.transfer(num_pages, 1)) for _ in range(cfg.rounds)]
    in_flight = max(1, min(cfg.in_flight, rx.pool.shape[0] // num_pages))
    pipelined_s = timed_s(lambda: rx.transfer(num_pages, in_flight))
    (room, dst), *_ = rx.transfer(num_pages, 1)
    src = src_pages_for(room, num_pages, sender_pool.shape[0])
    got = rx.pool[dst].reshape(num_pages, -1)
    assert torch.equal(got, sender_pool[src]), f"{size_mib} MiB: bytes differ"
    copy = copy_gbps(nbytes)
    kernels = kernel_gbps(rx, num_pages)
    return {
        "size_mib": nbytes / MIB,
        "copy_gbps": copy,
        "kernel_gbps": kernels,
        "serial_gbps": nbytes / statistics.median(serial) / 1e9,
        "serial_ms": 1e3 * statistics.median(serial),
        "pipelined_gbps": in_flight * nbytes / pipelined_s / 1e9,
        "in_flight": in_flight,
    }


def print_table(rows: list[dict]) -> None:
    print(f"\ndevice: {torch.cuda.get_device_name()}; cuda_ipc transport, scattered pages")
    head = (
        f"{'MiB':>6} {'copy GB/s':>10} {'1-by-1 GB/s':>12} {'ms':>7} {'x copy':>7} "
        f"{'in flight':>9} {'GB/s':>8} {'x copy':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['size_mib']:6.0f} {r['copy_gbps']:10.0f} {r['serial_gbps']:12.0f} "
            f"{r['serial_ms']:7.3f} {r['serial_gbps'] / r['copy_gbps']:7.2f} "
            f"{r['in_flight']:9d} {r['pipelined_gbps']:8.0f} "
            f"{r['pipelined_gbps'] / r['copy_gbps']:7.2f}"
        )
    print("GB/s are payload bytes per second (copy: one contiguous copy_ of the same size)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, TransferBenchConfig, "transfer bench")
    cfg = from_args(TransferBenchConfig, parser.parse_args(argv))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    pool_pages = int(cfg.pool_mib * MIB // (np.prod(PAGE_SHAPE) * 2))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sender = ctx.Process(target=sender_main, args=(child, pool_pages, 1), daemon=True)
    sender.start()
    try:
        if not parent.poll(TIMEOUT_S):
            raise TimeoutError("the sender did not start")
        pool = torch.zeros((pool_pages, *PAGE_SHAPE), dtype=torch.int16, device="cuda")
        rx = Receiver(pool, parent.recv())
        sender_pool = make_pool(pool_pages, 1).view(pool_pages, -1)  # the same bytes
        rows = [measure_size(rx, size, cfg, sender_pool) for size in cfg.sizes_mib]
        control_ms = 1e3 * statistics.median(timed_s(lambda: rx.transfer(0, 1)) for _ in range(20))
        rx.transport.close()
    finally:
        parent.send("stop")
        sender.join(TIMEOUT_S)
        if sender.is_alive():
            sender.kill()
    print_table(rows)
    print(f"control round trip (a 0-page transfer): {control_ms:.3f} ms")
    for r in rows:
        kernels = ", ".join(f"{k} {v:.0f}" for k, v in r["kernel_gbps"].items())
        print(f"{r['size_mib']:6.0f} MiB copy kernel alone, GB/s by (words, warps): {kernels}")
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "gpu_transfer.json"), "w") as f:
            report = {"config": asdict(cfg), "rows": rows, "control_ms": control_ms}
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
