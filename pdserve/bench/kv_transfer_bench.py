"""KV transfer throughput: the KV transport against raw TCP, two processes over loopback.

Run as `python -m pdserve.bench.kv_transfer_bench`. This process receives (decode side); a
spawned process sends (prefill side). Rounds alternate between the methods so that noise
from other load hits them alike; each timing covers one request round trip plus the payload.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound, KVReceived, KVTransport, make_transport
from pdserve.disagg.transfer.base import TransportOptions

MIB = 1 << 20
PAGE_SHAPE = (16, 2, 16, 4, 32)  # layers, k/v, tokens per page, kv heads, head dim: 256 KiB fp32
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Args:
    sizes_mib: list[int]
    rounds: int
    frame_mib: float
    backend: str
    torch_threads: int


def make_pool(num_pages: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((num_pages, *PAGE_SHAPE), generator=gen)


def page_ids(pattern: str, num_pages: int, pool_pages: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(num_pages))
    return np.random.default_rng(seed).permutation(pool_pages)[:num_pages].tolist()


# -- the sending process --------------------------------------------------------------------
def sender_main(cmds, args: Args, pool_pages: int) -> None:
    torch.set_num_threads(args.torch_threads)
    pool = make_pool(pool_pages, seed=1)
    options = TransportOptions(frame_nbytes=int(args.frame_mib * MIB))
    transport = make_transport(args.backend, pool, "127.0.0.1", options=options)
    listener = socket.create_server(("127.0.0.1", 0))
    cmds.send((transport.endpoint, listener.getsockname()[1]))
    raw, _ = listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pool_bytes = memoryview(pool.view(torch.uint8).numpy()).cast("B")
    inbox: list[Inbound] = []  # page lists that came while the previous transfer drained
    while (cmd := cmds.recv()) is not None:
        if cmd[0] == "raw":
            raw.recv(8)
            raw.sendall(pool_bytes[: cmd[1]])
        else:
            serve_one_transfer(transport, inbox, src_page_ids=cmd[1])
    transport.close()
    raw.close()


def serve_one_transfer(
    transport: KVTransport, inbox: list[Inbound], src_page_ids: list[int]
) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    handle = None
    while handle is None or not handle.done():
        if time.monotonic() > deadline:
            raise TimeoutError("sender: transfer did not finish")
        inbox += [
            e
            for e in transport.poll(1 if handle is None else 0)
            if isinstance(e, Inbound) and isinstance(e.msg, m.PageList)
        ]
        if handle is None and inbox:
            event = inbox.pop(0)
            room, dst_page_ids = event.msg.room, event.msg.dst_page_ids
            then = m.RoomStatus(room=room, ok=True)
            handle = transport.send_kv(event.peer, room, src_page_ids, dst_page_ids, then)


# -- the receiving process --------------------------------------------------------------------
def time_raw(raw: socket.socket, buffer: memoryview, nbytes: int) -> float:
    start = time.perf_counter()
    raw.sendall(b"go\0\0\0\0\0\0")
    got = 0
    while got < nbytes:
        n = raw.recv_into(buffer[got:nbytes])
        if n == 0:
            raise ConnectionError("sender closed the raw TCP socket")
        got += n
    return time.perf_counter() - start


def time_transport(transport: KVTransport, peer: str, room: int, dst: list[int]) -> float:
    start = time.perf_counter()
    transport.send(peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=len(dst)))
    received = None
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for event in transport.poll(1):
            if isinstance(event, KVReceived):
                received = event
            elif isinstance(event, Inbound) and isinstance(event.msg, m.RoomStatus):
                elapsed = time.perf_counter() - start
                if received is None or not received.complete:
                    raise RuntimeError(f"room {room}: incomplete transfer {received}")
                return elapsed
    raise TimeoutError(f"room {room}: no RoomStatus within {TIMEOUT_S}s")


class Receiver:
    """The decode side: drives the sender, times each method, checks the bytes that landed."""

    def __init__(self, args: Args, pool_pages: int) -> None:
        self.args = args
        self.pool_pages = pool_pages
        self.pool = make_pool(pool_pages, seed=2)
        self.expected = make_pool(pool_pages, seed=1)  # the sender's pool, for checking
        self.buffer = memoryview(self.pool.view(torch.uint8).numpy()).cast("B")
        self.room = 0

    def run(self) -> list[tuple[int, dict[str, float]]]:
        ctx = mp.get_context("spawn")
        cmds, child_cmds = ctx.Pipe()
        proc = ctx.Process(target=sender_main, args=(child_cmds, self.args, self.pool_pages))
        proc.start()
        try:
            endpoint, raw_port = cmds.recv()
            options = TransportOptions(frame_nbytes=int(self.args.frame_mib * MIB))
            self.transport = make_transport(self.args.backend, self.pool, None, options=options)
            self.peer = self.transport.connect(endpoint)
            self.raw = socket.create_connection(("127.0.0.1", raw_port), timeout=TIMEOUT_S)
            self.cmds = cmds
            rows = [(size, self.measure(size * MIB)) for size in self.args.sizes_mib]
            cmds.send(None)
            proc.join(TIMEOUT_S)
            return rows
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()

    def measure(self, nbytes: int) -> dict[str, float]:
        num_pages = nbytes // self.pool[0].nbytes
        times: dict[str, list[float]] = {"raw": [], "contiguous": [], "scattered": []}
        for round_index in range(self.args.rounds + 1):  # round 0 warms up and checks
            for method, seconds in self.one_round(nbytes, num_pages, check=round_index == 0):
                if round_index > 0:
                    times[method].append(seconds)
        return {method: nbytes / statistics.median(ts) / 1e9 for method, ts in times.items()}

    def one_round(self, nbytes: int, num_pages: int, check: bool):
        self.cmds.send(("raw", nbytes))
        yield "raw", time_raw(self.raw, self.buffer, nbytes)
        for pattern in ("contiguous", "scattered"):
            src = page_ids(pattern, num_pages, self.pool_pages, seed=self.room)
            dst = page_ids(pattern, num_pages, self.pool_pages, seed=self.room + 1)
            self.room += 1
            self.cmds.send(("kv", src))
            yield pattern, time_transport(self.transport, self.peer, self.room, dst)
            if (
                check
                and self.args.backend != "fake"
                and not torch.equal(self.pool[dst], self.expected[src])
            ):
                raise RuntimeError(f"{pattern} transfer of {nbytes} bytes: pages differ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (median)")
    parser.add_argument("--frame-mib", type=float, default=TransportOptions.frame_nbytes / MIB)
    parser.add_argument("--backend", default="zmq", choices=["zmq", "fake"])
    parser.add_argument("--torch-threads", type=int, default=1)
    args = Args(**vars(parser.parse_args(argv)))
    torch.set_num_threads(args.torch_threads)
    page_nbytes = make_pool(1, seed=0)[0].nbytes
    pool_pages = max(args.sizes_mib) * MIB // page_nbytes * 5 // 4  # room to scatter
    rows = Receiver(args, pool_pages).run()
    print(
        f"KV transfer, 2 processes over loopback; page {page_nbytes // 1024} KiB, "
        f"frame {args.frame_mib:g} MiB, backend {args.backend}, median of {args.rounds}"
    )
    print(
        f"{'payload':>8} | {'raw TCP GB/s':>12} | {'KV contig GB/s':>14} | {'ratio':>5} "
        f"| {'KV scattered GB/s':>17} | {'ratio':>5}"
    )
    for size, gbps in rows:
        raw = gbps["raw"]
        print(
            f"{size:>5} MiB | {raw:12.2f} | {gbps['contiguous']:14.2f} | "
            f"{gbps['contiguous'] / raw:5.2f} | {gbps['scattered']:17.2f} | "
            f"{gbps['scattered'] / raw:5.2f}"
        )


if __name__ == "__main__":
    main()
