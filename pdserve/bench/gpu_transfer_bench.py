"""KV transfer over the cuda_ipc transport between two processes on one GPU, against the
device copy bandwidth measured in the same run (payload bytes per second for both), with
control messages on the transport's Unix datagram lane and, as the baseline, on ZeroMQ.

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
from pdserve.disagg.transfer.base import Inbound, KVReceived, TransportOptions
from pdserve.disagg.transfer.cuda_ipc import CudaIpcTransport

MIB = 1 << 20
# One page of the Llama-3-8B shape: 32 layers, K and V, 16 tokens, 8 KV heads, 128 dims, bf16.
PAGE_SHAPE = (32, 2, 16, 8, 128)
TIMEOUT_S = 120.0
# How control messages travel: the lane (the default: it sleeps at once when idle); the lane,
# spinning for 200 us before it sleeps; the lane with both loops never asleep between
# transfers (`hot`: spinning 5 ms, as the loops of busy servers are: they poll between
# steps); ZeroMQ, as before the lane (the baseline). `hot-jit` is `hot` with the prefill side
# launching each copy through Triton's JIT and setting each flag with a fill kernel, as
# before the direct launch (`CudaIpcTransport.direct_launch`): the launch path's baseline.
CONTROLS = {  # name: (transport options, direct launch)
    "lane": (TransportOptions(), True),
    "lane-spin": (TransportOptions(lane_spin_us=200), True),
    "hot": (TransportOptions(lane_spin_us=5000), True),
    "hot-jit": (TransportOptions(lane_spin_us=5000), False),
    "zmq": (TransportOptions(ipc_lane=False), True),
}
COPY_VARIANTS = [
    (2048, 4),
    (1024, 4),
    (4096, 4),
    (4096, 8),
    (8192, 8),
    (16384, 16),
    (512, 2),
]  # (int64 words, warps)


@dataclass(frozen=True)
class TransferBenchConfig:
    sizes_mib: list[int] = opt([16, 64, 256, 1024], "payload per transfer, MiB")
    rounds: int = opt(10, "timed transfers per size (one at a time)")
    in_flight: int = opt(8, "transfers in flight in the pipelined measurement")
    pool_mib: int = opt(2048, "KV pool of each side, MiB")
    controls: list[str] = opt(
        list(CONTROLS), "control channels to measure, each with its own sender process"
    )
    stage_sizes_mib: list[int] = opt([0, 16, 64], "sizes whose transfer is split into stages")
    profile: bool = opt(False, "print where the decode side's time goes in 0-page transfers")
    out_dir: str | None = opt(None, "write gpu_transfer.json here")

    def __post_init__(self) -> None:
        check(all(0 < s <= self.pool_mib for s in self.sizes_mib), "sizes must fit the pool")
        check(set(self.controls) <= CONTROLS.keys(), f"--controls: some of {list(CONTROLS)}")
        check(self.rounds > 0 and self.in_flight > 0, "--rounds and --in-flight must be > 0")


def make_pool(num_pages: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (num_pages, *PAGE_SHAPE)
    return torch.randint(-30000, 30000, shape, generator=gen, device="cuda", dtype=torch.int16)


def src_pages_for(room: int, num_pages: int, pool_pages: int) -> list[int]:
    """Which prefill pages hold `room` (both processes compute the same answer)."""
    return np.random.default_rng(room).permutation(pool_pages)[:num_pages].tolist()


def sender_main(
    conn, pool_pages: int, seed: int, options: TransportOptions | None = None, direct: bool = True
) -> None:
    """Prefill side: answer every PageList with send_kv from the room's source pages, and
    report each room's (room, send_kv called, send_kv returned) on `conn` once its wake-up
    left (the pipe adds no delay to the transfer). For tests, "hold" on `conn` stops it
    reading its transport (it answers "held") until ("go", room): it then reads messages
    until the Abort of `room` came before it sends anything, so that Abort ends the room's
    grant first whatever the channel's timing. Anything else on `conn` stops it."""
    CudaIpcTransport.direct_launch = direct  # this process only: it is spawned
    pool = make_pool(pool_pages, seed)
    torch.cuda.synchronize()
    transport = CudaIpcTransport(pool, listen_host="127.0.0.1", options=options)
    times: dict[int, tuple[float, float]] = {}
    send_wakes = transport._send_wakes

    def send_and_report() -> None:
        rooms = [room for rooms in transport._wakes.values() for room in rooms]
        send_wakes()
        for room in rooms:
            conn.send((room, *times.pop(room)))

    def answer(events: list) -> None:
        for event in events:
            if isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                msg = event.msg
                src = src_pages_for(msg.room, len(msg.dst_page_ids), pool_pages)
                then = m.RoomStatus(room=msg.room, ok=True)
                called = time.perf_counter()  # CLOCK_MONOTONIC: one clock for both
                transport.send_kv(event.peer, msg.room, src, msg.dst_page_ids, then)
                times[msg.room] = (called, time.perf_counter())

    transport._send_wakes = send_and_report  # type: ignore[method-assign]
    conn.send(transport.endpoint)
    deadline = time.monotonic() + 10 * TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if conn.poll():
                if conn.recv() != "hold":
                    break
                conn.send("held")
                go = conn.recv() if conn.poll(TIMEOUT_S) else None
                if not (isinstance(go, tuple) and go[0] == "go"):
                    break
                answer(read_until_abort(transport, go[1], deadline))
            answer(transport.poll(5))
    finally:
        transport.close()


def read_until_abort(transport: CudaIpcTransport, room: int, deadline: float) -> list:
    """Poll until the Abort of `room` came (or the deadline); the events so far."""
    events: list = []
    while time.monotonic() < deadline and not any(
        isinstance(e, Inbound) and isinstance(e.msg, m.Abort) and e.msg.room == room for e in events
    ):
        events += transport.poll(5)
    return events


class Receiver:
    """Decode side: grant pages for rooms and wait until their KV is in the pool."""

    def __init__(
        self, pool: torch.Tensor, endpoint: str, options: TransportOptions | None = None
    ) -> None:
        self.pool = pool
        self.transport = CudaIpcTransport(pool, listen_host=None, options=options)
        self.peer = self.transport.connect(endpoint)
        self.next_room = 1
        self.rng = np.random.default_rng(0)
        self.received_at = 0.0  # when the last transfer's last KVReceived came out of poll

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
                    self.received_at = time.perf_counter()
        # No synchronize: a room's KVReceived comes from its completion flag, which the
        # prefill side's GPU sets after the copy; the bytes are in this pool by then.
        return rooms


def timed_s(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def copy_gbps(nbytes: int) -> float:
    """Payload bytes per second of one contiguous device-to-device copy_ (CUDA events, the
    launch hidden: the copy's GPU time)."""
    from pdserve.bench.gpu_bench import median_event_ms

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return nbytes / median_event_ms(lambda: dst.copy_(src), 10, hide_launch=True) / 1e6


def kernel_gbps(rx: Receiver, num_pages: int, sender_pool: torch.Tensor) -> dict[str, float]:
    """The page-copy kernel alone (its GPU time: the launch hidden), a pool of the prefill
    side's bytes -> this pool, ids on the device, per (block, warps) (an IPC mapping does
    not change the kernel's bandwidth)."""
    from pdserve.bench.gpu_bench import median_event_ms
    from pdserve.engine.gpu.copy_pages import copy_pages

    src_pool = sender_pool.view(torch.int64)
    dst_pool = rx.pool.view(torch.uint8).view(rx.pool.shape[0], -1).view(torch.int64)
    src = src_pages_for(0, num_pages, src_pool.shape[0])
    dst = rx.rng.permutation(dst_pool.shape[0])[:num_pages].tolist()
    ids = torch.tensor([src, dst], device="cuda")
    nbytes = num_pages * dst_pool.shape[1] * 8
    out = {}
    for block, warps in COPY_VARIANTS:

        def run(block: int = block, warps: int = warps) -> None:
            copy_pages(src_pool, dst_pool, ids, block, warps)

        ms = median_event_ms(run, 10, hide_launch=True)
        out[f"{block}x{warps}"] = nbytes / ms / 1e6
    return out


def sender_times(clock, rooms: list[int]) -> dict[int, tuple[float, float]]:
    """Each room's (send_kv called, send_kv returned), as the prefill side reports them."""
    times: dict[int, tuple[float, float]] = {}
    while not set(rooms) <= times.keys():
        if not clock.poll(TIMEOUT_S):
            raise TimeoutError("the sender stopped reporting its send times")
        room, called, returned = clock.recv()
        times[room] = (called, returned)
    return times


def sent_at(clock, rooms: list[int]) -> float:
    """When the prefill side called send_kv for the first of `rooms`."""
    return min(called for called, _ in sender_times(clock, rooms).values())


def timed_transfer(rx: Receiver, clock, num_pages: int, num_rooms: int) -> tuple[float, float]:
    """(seconds from the first send_kv to all bytes in the pool, seconds from the page
    lists to all bytes in the pool: the control round trip included)."""
    started = time.perf_counter()
    rooms = rx.transfer(num_pages, num_rooms)
    done = time.perf_counter()
    return done - sent_at(clock, [r for r, _ in rooms]), done - started


def measure_size(rx: Receiver, clock, size_mib: int, cfg: TransferBenchConfig, sender_pool):
    page_nbytes = rx.transport.page_nbytes
    num_pages = max(1, size_mib * MIB // page_nbytes)
    nbytes = num_pages * page_nbytes
    timed_transfer(rx, clock, num_pages, 1)  # warm-up (the first copy compiles the kernel)
    serial = [timed_transfer(rx, clock, num_pages, 1) for _ in range(cfg.rounds)]
    one_way_s = statistics.median(s for s, _ in serial)
    round_trip_s = statistics.median(s for _, s in serial)
    in_flight = max(1, min(cfg.in_flight, rx.pool.shape[0] // num_pages))
    pipelined_s, _ = timed_transfer(rx, clock, num_pages, in_flight)
    (room, dst), *_ = rx.transfer(num_pages, 1)
    sent_at(clock, [room])
    src = src_pages_for(room, num_pages, sender_pool.shape[0])
    got = rx.pool[dst].reshape(num_pages, -1)
    assert torch.equal(got, sender_pool[src]), f"{size_mib} MiB: bytes differ"
    kernels = kernel_gbps(rx, num_pages, sender_pool)
    return {
        "size_mib": nbytes / MIB,
        "copy_gbps": copy_gbps(nbytes),
        "kernel_gbps": max(kernels.values()),
        "kernel_variants_gbps": kernels,
        "one_way_gbps": nbytes / one_way_s / 1e9,
        "one_way_ms": 1e3 * one_way_s,
        "round_trip_ms": 1e3 * round_trip_s,
        "pipelined_gbps": in_flight * nbytes / pipelined_s / 1e9,
        "in_flight": in_flight,
    }


def print_table(control: str, rows: list[dict], zero: dict[str, float]) -> None:
    print(f"\ndevice: {torch.cuda.get_device_name()}; cuda_ipc transport, scattered 2 MiB pages")
    print(f"control messages on: {control}")
    head = (
        f"{'MiB':>6} {'copy GB/s':>9} {'kernel':>7} {'x copy':>6} {'send->pool':>10} {'ms':>6} "
        f"{'x copy':>6} {'in flight':>9} {'GB/s':>6} {'x copy':>6} {'round trip ms':>13}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        copy = r["copy_gbps"]
        print(
            f"{r['size_mib']:6.0f} {copy:9.0f} {r['kernel_gbps']:7.0f} "
            f"{r['kernel_gbps'] / copy:6.2f} {r['one_way_gbps']:10.0f} {r['one_way_ms']:6.3f} "
            f"{r['one_way_gbps'] / copy:6.2f} {r['in_flight']:9d} {r['pipelined_gbps']:6.0f} "
            f"{r['pipelined_gbps'] / copy:6.2f} {r['round_trip_ms']:13.3f}"
        )
        variants = ", ".join(f"{k} {v:.0f}" for k, v in r["kernel_variants_gbps"].items())
        print(f"{'':6} kernel (int64 words x warps) GB/s: {variants}")
    print(
        "GB/s: payload bytes per second. copy: one contiguous copy_ (CUDA events, its launch\n"
        "hidden: GPU time); kernel: the page-copy kernel alone on the mapped pool (the same,\n"
        "best variant); send->pool: from the prefill side's send_kv to the bytes in the decode\n"
        "pool, one transfer at a time; in flight: several rooms at once, same span; round\n"
        "trip: from the page list to the bytes.\n"
        f"control round trip alone (a 0-page transfer): {zero['round_trip_ms']:.3f} ms, of which "
        f"send_kv -> KVReceived {zero['one_way_ms']:.3f} ms (medians)"
    )


def zero_page_ms(rx: Receiver, clock, rounds: int = 200) -> dict[str, float]:
    """Medians of the 0-page transfer: the control messages alone."""
    for _ in range(20):  # warm-up
        timed_transfer(rx, clock, 0, 1)
    times = [timed_transfer(rx, clock, 0, 1) for _ in range(rounds)]
    return {
        "round_trip_ms": 1e3 * statistics.median(t for _, t in times),
        "one_way_ms": 1e3 * statistics.median(t for t, _ in times),
        "round_trip_p90_ms": 1e3 * sorted(t for _, t in times)[int(0.9 * rounds)],
    }


STAGES = {  # stage: (from mark, to mark)
    "prefill: send_kv (checks, status, copy launch)": ("called", "returned"),
    "copy + slot set -> decode's poll sees it": ("returned", "received"),
    "total: send_kv -> bytes in pool (KVReceived)": ("called", "received"),
}


def stage_ms(rx: Receiver, clock, num_pages: int, rounds: int = 100) -> dict[str, float]:
    """Median ms of each stage of a one-room transfer (STAGES), both processes timing on
    CLOCK_MONOTONIC."""
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for i in range(rounds + 10):  # the first 10 warm up
        (room, _), *_ = rx.transfer(num_pages, 1)
        marks = {"received": rx.received_at}
        marks["called"], marks["returned"] = sender_times(clock, [room])[room]
        for stage, (start, end) in STAGES.items():
            if i >= 10:
                samples[stage].append(1e3 * (marks[end] - marks[start]))
    return {stage: statistics.median(ms) for stage, ms in samples.items()}


def print_stages(control: str, stages: dict[int, dict[str, float]]) -> None:
    sizes = list(stages)
    print(f"\nwhere a transfer's time goes, {control} (median ms of 100 one-room transfers):")
    print(f"{'stage':48} " + " ".join(f"{f'{s} MiB':>9}" for s in sizes))
    for stage in STAGES:
        print(f"{stage:48} " + " ".join(f"{stages[s][stage]:9.3f}" for s in sizes))


def print_launch_ratios(direct: dict, jit: dict) -> None:
    """hot / hot-jit, stage by stage: what the direct launch saves."""
    print("\ndirect launch / JIT launch (hot, same run), per stage:")
    print(f"{'stage':48} " + " ".join(f"{f'{s} MiB':>9}" for s in direct))
    for stage in STAGES:
        ratios = [direct[s][stage] / jit[s][stage] for s in direct]
        print(f"{stage:48} " + " ".join(f"{r:9.3f}" for r in ratios))


def print_profile(rx: Receiver, clock, rounds: int = 200) -> None:
    """cProfile of the decode side (this process) over 0-page transfers."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(rounds):
        timed_transfer(rx, clock, 0, 1)
    profile.disable()
    print(f"\ndecode side, {rounds} 0-page transfers ({rx.transport.options}):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


def measure_control(cfg: TransferBenchConfig, pool_pages: int, control: str) -> dict:
    """Every figure over one control channel, against a fresh sender process."""
    options, direct = CONTROLS[control]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (child, pool_pages, 1, options, direct)
    sender = ctx.Process(target=sender_main, args=args, daemon=True)
    sender.start()
    try:
        if not parent.poll(TIMEOUT_S):
            raise TimeoutError("the sender did not start")
        pool = torch.zeros((pool_pages, *PAGE_SHAPE), dtype=torch.int16, device="cuda")
        rx = Receiver(pool, parent.recv(), options)
        sender_pool = make_pool(pool_pages, 1).view(pool_pages, -1)  # the same bytes
        rows = [measure_size(rx, parent, size, cfg, sender_pool) for size in cfg.sizes_mib]
        zero = zero_page_ms(rx, parent)
        page_mib = rx.transport.page_nbytes / MIB
        stages = {size: stage_ms(rx, parent, int(size // page_mib)) for size in cfg.stage_sizes_mib}
        if cfg.profile:
            print_profile(rx, parent)
        rx.transport.close()
        del pool, sender_pool
        torch.cuda.empty_cache()
    finally:
        parent.send("stop")
        sender.join(TIMEOUT_S)
        if sender.is_alive():
            sender.kill()
    return {"rows": rows, "zero_page": zero, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, TransferBenchConfig, "transfer bench")
    cfg = from_args(TransferBenchConfig, parser.parse_args(argv))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    pool_pages = int(cfg.pool_mib * MIB // (np.prod(PAGE_SHAPE) * 2))
    results = {c: measure_control(cfg, pool_pages, c) for c in cfg.controls}
    for control, result in results.items():
        print_table(control, result["rows"], result["zero_page"])
        print_stages(control, result["stages"])
    if {"hot", "hot-jit"} <= results.keys():
        print_launch_ratios(results["hot"]["stages"], results["hot-jit"]["stages"])
    if "zmq" in results:
        base = results["zmq"]["zero_page"]["round_trip_ms"]
        for control, result in results.items():
            ratio = result["zero_page"]["round_trip_ms"] / base
            print(f"control round trip, {control} / zmq (same run): {ratio:.3f}")
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "gpu_transfer.json"), "w") as f:
            json.dump({"config": asdict(cfg), "controls": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
