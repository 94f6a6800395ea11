"""The KV channel's control round trip between two processes on one host: a 0-page transfer
(PageList -> send_kv -> KVReceived) with control messages on ZeroMQ (`fake`, the baseline)
and on the cuda_ipc backend's lane (`fake_lane`: sleeping at once, as by default, or
spinning for 200 us first), rounds
alternating so that other load on the host hits every channel alike.

Run: `python -m pdserve.bench.control_bench [--rounds 2000]`. CPU only; on a GPU host,
gpu_transfer_bench times the same path with the CUDA parts in it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch

from pdserve.config import add_arguments, check, from_args, opt
from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound, KVReceived, make_transport
from pdserve.disagg.transfer.base import TransportOptions

TIMEOUT_S = 60.0
# name -> (backend, options); every channel gets its own sender process.
CHANNELS = {
    "zmq": ("fake", TransportOptions()),
    "lane": ("fake_lane", TransportOptions()),
    "lane-spin": ("fake_lane", TransportOptions(lane_spin_us=200)),
}


@dataclass(frozen=True)
class ControlBenchConfig:
    rounds: int = opt(2000, "timed 0-page transfers per channel")
    warmup: int = opt(100, "untimed transfers per channel first")
    channels: list[str] = opt(list(CHANNELS), "channels to time; the first is the baseline")

    def __post_init__(self) -> None:
        check(self.rounds > 0 and self.warmup >= 0, "--rounds > 0, --warmup >= 0")
        check(bool(self.channels) and set(self.channels) <= CHANNELS.keys(), "unknown channel")


def new_pool() -> torch.Tensor:
    return torch.zeros(8, 16, dtype=torch.uint8)


def sender_main(conn, backend: str, options: TransportOptions) -> None:
    """Prefill side: answer every PageList at once with a 0-page send_kv."""
    transport = make_transport(backend, new_pool(), "127.0.0.1", options=options)
    conn.send(transport.endpoint)
    try:
        while not conn.poll():
            for event in transport.poll(5):
                if isinstance(event, Inbound) and isinstance(event.msg, m.PageList):
                    room = event.msg.room
                    then = m.RoomStatus(room=room, ok=True)
                    transport.send_kv(event.peer, room, [], [], then)
    finally:
        transport.close()


class Channel:
    """Decode side of one channel: its transport and the sender process it talks to."""

    def __init__(self, name: str) -> None:
        backend, options = CHANNELS[name]
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=sender_main, args=(child, backend, options), daemon=True)
        self.proc.start()
        if not self.conn.poll(TIMEOUT_S):
            raise TimeoutError(f"the {name} sender did not start")
        self.transport = make_transport(backend, new_pool(), None, options=options)
        self.peer = self.transport.connect(self.conn.recv())
        self.room = 0

    def round_trip_s(self) -> float:
        self.room += 1
        started = time.perf_counter()
        page_list = m.PageList(room=self.room, dst_page_ids=[], prompt_len=1)
        self.transport.send(self.peer, page_list)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            for event in self.transport.poll(5):
                if isinstance(event, KVReceived) and event.room == self.room:
                    return time.perf_counter() - started
        raise TimeoutError(f"room {self.room} never arrived")

    def close(self) -> None:
        self.transport.close()
        self.conn.send("stop")
        self.proc.join(TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()


def measure(cfg: ControlBenchConfig) -> dict[str, list[float]]:
    channels = {name: Channel(name) for name in cfg.channels}
    times: dict[str, list[float]] = {name: [] for name in channels}
    try:
        for i in range(cfg.warmup + cfg.rounds):
            for name, channel in channels.items():
                took_s = channel.round_trip_s()
                if i >= cfg.warmup:
                    times[name].append(took_s)
    finally:
        for channel in channels.values():
            channel.close()
    return times


def report(times: dict[str, list[float]]) -> str:
    base_name = next(iter(times))
    base = statistics.median(times[base_name])
    lines = [
        f"{'channel':>11} {'median ms':>9} {'p90 ms':>7} {'x ' + base_name:>8}",
    ]
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * len(samples))]
        lines.append(f"{name:>11} {1e3 * median:9.3f} {1e3 * p90:7.3f} {median / base:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, ControlBenchConfig, "control bench")
    cfg = from_args(ControlBenchConfig, parser.parse_args(argv))
    print(report(measure(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
