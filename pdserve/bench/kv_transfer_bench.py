"""KV transfer throughput: the KV transport against raw TCP, two processes over loopback.

Run as `python -m pdserve.bench.kv_transfer_bench`. This process receives (decode side); a
spawned process sends (prefill side). Rounds alternate between the methods so that noise
from other load hits them alike. A timing runs from the sender starting to send (the request
- raw TCP's 8 bytes, the KV PageList - is already there, as in serving, where the page list
comes long before prefill ends) until the receiver has every byte (KV: its RoomStatus), on
CLOCK_MONOTONIC, which both processes share.
"ZeroMQ alone" (frames received and dropped) is the ceiling for any ZeroMQ-based transport.
The receiver handshakes first, as a decode worker does, so the transport's data connection
is open before the first transfer (`--no-data-channel`: page bytes go as ZeroMQ frames).
Where NIXL is installed, the nixl backend runs in the same rounds (scattered pages) twice:
over UCX's choice on one host (shared memory: CMA) and over UCX_TLS=tcp.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound, KVReceived, KVTransport, make_transport
from pdserve.disagg.transfer.base import TransportOptions
from pdserve.disagg.transfer.nixl_agent import nixl_missing

MIB = 1 << 20
PAGE_SHAPE = (16, 2, 16, 4, 32)  # layers, k/v, tokens per page, kv heads, head dim: 256 KiB fp32
TIMEOUT_S = 60.0


def now_s() -> float:
    """A clock both processes share, so one process can time what the other started."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


METHODS = ("raw", "zmq_only", "contiguous", "scattered", "nixl_shm", "nixl_tcp")
NIXL_TLS = {"nixl_shm": None, "nixl_tcp": "tcp"}  # UCX_TLS per NIXL method (None: UCX picks)


@dataclass(frozen=True)
class Args:
    sizes_mib: list[int]
    rounds: int
    frame_mib: float
    backend: str
    torch_threads: int
    data_channel: bool
    nixl: bool

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.nixl else METHODS[:4]


def make_pool(num_pages: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((num_pages, *PAGE_SHAPE), generator=gen)


def page_ids(pattern: str, num_pages: int, pool_pages: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(num_pages))
    return np.random.default_rng(seed).permutation(pool_pages)[:num_pages].tolist()


# -- the sending process --------------------------------------------------------------------
def make_transports(args: Args, pool: torch.Tensor, host: str | None) -> dict[str, KVTransport]:
    """The --backend transport as "kv", and the NIXL ones when asked for."""
    transports = {"kv": make_transport(args.backend, pool, host, options=transport_options(args))}
    for method, tls in NIXL_TLS.items() if args.nixl else ():
        before = os.environ.pop("UCX_TLS", None)
        if tls is not None:  # UCX reads it when NIXL creates the agent's UCX context
            os.environ["UCX_TLS"] = tls
        try:
            transports[method] = make_transport("nixl", pool, host)
        finally:
            os.environ.pop("UCX_TLS", None)
            if before is not None:
                os.environ["UCX_TLS"] = before
    return transports


def sender_main(cmds, args: Args, pool_pages: int) -> None:
    torch.set_num_threads(args.torch_threads)
    pool = make_pool(pool_pages, seed=1)
    transports = make_transports(args, pool, "127.0.0.1")
    listener = socket.create_server(("127.0.0.1", 0))
    plain = zmq.Context().socket(zmq.ROUTER)
    plain.bind("tcp://127.0.0.1:*")
    endpoints = {name: t.endpoint for name, t in transports.items()}
    cmds.send((endpoints, listener.getsockname()[1], plain.last_endpoint.decode()))
    raw, _ = listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pool_bytes = memoryview(pool.view(torch.uint8).numpy()).cast("B")
    frame_nbytes = int(args.frame_mib * MIB)
    inboxes = {name: Inbox(t) for name, t in transports.items()}

    def send_raw(nbytes: int) -> float:
        raw.recv(8)
        start_s = now_s()
        raw.sendall(pool_bytes[:nbytes])
        return start_s

    def send_zmq_only(nbytes: int) -> float:
        peer = plain.recv_multipart()[0]
        start_s = now_s()
        for start in range(0, nbytes, frame_nbytes):
            frame = pool_bytes[start : min(start + frame_nbytes, nbytes)]
            tracker = plain.send_multipart([peer, frame], copy=False, track=True)
        tracker.wait(TIMEOUT_S)  # CPU is counted until ZeroMQ has sent everything
        return start_s

    handlers = {
        "handshake": lambda name: answer_handshake(inboxes[name]),
        "raw": send_raw,
        "zmq_only": send_zmq_only,
        "kv": lambda arg: serve_one_transfer(inboxes[arg[0]], src_page_ids=arg[1]),
    }
    while (cmd := next_command(cmds, list(inboxes.values()))) is not None:
        cpu_s = time.process_time()
        start_s = handlers[cmd[0]](cmd[1])
        cmds.send((time.process_time() - cpu_s, start_s))
    for transport in transports.values():
        transport.close()
    raw.close()
    plain.close(linger=0)


def transport_options(args: Args) -> TransportOptions:
    return TransportOptions(frame_nbytes=int(args.frame_mib * MIB), data_channel=args.data_channel)


class Inbox:
    """The sender's control messages, kept until used: a page list or the handshake may come
    before the command that uses it."""

    def __init__(self, transport: KVTransport) -> None:
        self.transport = transport
        self.events: list[Inbound] = []

    def poll(self, timeout_ms: int) -> None:
        self.events += [e for e in self.transport.poll(timeout_ms) if isinstance(e, Inbound)]

    def take(self, kind: type) -> Inbound | None:
        for i, event in enumerate(self.events):
            if isinstance(event.msg, kind):
                return self.events.pop(i)
        return None


def next_command(cmds, inboxes: list[Inbox]) -> Any:
    """Wait for the receiver's next command, polling the transports meanwhile as a worker
    loop does (a handshake answer leaves once the data connection is open)."""
    poller = zmq.Poller()
    for sock in [cmds.fileno(), *(s for i in inboxes for s in i.transport.sockets())]:
        poller.register(sock, zmq.POLLIN)
    while not cmds.poll(0):
        poller.poll(100)
        for inbox in inboxes:
            inbox.poll(0)
    return cmds.recv()


def answer_handshake(inbox: Inbox) -> float:
    """Answer the receiver's Handshake (the answer leaves once the data connection is open)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (event := inbox.take(m.Handshake)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("sender: no handshake")
        inbox.poll(1)
    transport = inbox.transport
    error = transport.accept_peer_meta(event.peer, event.msg.transfer_meta)
    meta = transport.handshake_meta()
    transport.send(event.peer, m.HandshakeResult(ok=error is None, error=error, transfer_meta=meta))
    return now_s()


def serve_one_transfer(inbox: Inbox, src_page_ids: list[int]) -> float:
    """Answer the next PageList with `src_page_ids`; returns when send_kv was called."""
    deadline = time.monotonic() + TIMEOUT_S
    handle = None
    start_s = 0.0
    while handle is None or not handle.done():
        if time.monotonic() > deadline:
            raise TimeoutError("sender: transfer did not finish")
        inbox.poll(1)
        if handle is None and (event := inbox.take(m.PageList)) is not None:
            room, dst_page_ids = event.msg.room, event.msg.dst_page_ids
            then = m.RoomStatus(room=room, ok=True)
            start_s = now_s()
            handle = inbox.transport.send_kv(event.peer, room, src_page_ids, dst_page_ids, then)
    return start_s


# -- the receiving process --------------------------------------------------------------------
def time_raw(raw: socket.socket, buffer: memoryview, nbytes: int) -> float:
    """Ask for `nbytes` and receive them into the pool; returns when the last one came."""
    raw.sendall(b"go\0\0\0\0\0\0")
    got = 0
    while got < nbytes:
        n = raw.recv_into(buffer[got:nbytes])
        if n == 0:
            raise ConnectionError("sender closed the raw TCP socket")
        got += n
    return now_s()


def time_zmq_only(sock: zmq.Socket, nbytes: int) -> float:
    """Plain ZeroMQ frames, received and dropped: the ceiling for any ZeroMQ transport."""
    sock.send(b"go")
    got = 0
    while got < nbytes:
        got += len(sock.recv(copy=False))
    return now_s()


def handshake(transport: KVTransport, peer: str, backend: str) -> float:
    """Handshake as a decode worker does; returns when the answer came."""
    layout = m.KVLayout(
        page_size=PAGE_SHAPE[2],
        kv_dtype="float32",
        num_layers=PAGE_SHAPE[0],
        num_kv_heads=PAGE_SHAPE[3],
        head_dim=PAGE_SHAPE[4],
        model_fingerprint="kv_transfer_bench",
    )
    meta = transport.handshake_meta()
    hello = m.Handshake(decode_id="bench", layout=layout, backend=backend, transfer_meta=meta)
    transport.send(peer, hello)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for event in transport.poll(1):
            if isinstance(event, Inbound) and isinstance(event.msg, m.HandshakeResult):
                answer = event.msg
                error = answer.error or transport.accept_peer_meta(peer, answer.transfer_meta)
                if error is not None:
                    raise RuntimeError(f"handshake refused: {error}")
                return now_s()
    raise TimeoutError("no handshake answer")


def time_transport(transport: KVTransport, peer: str, room: int, dst: list[int]) -> float:
    """Send a PageList, take the KV in; returns when its RoomStatus came."""
    transport.send(peer, m.PageList(room=room, dst_page_ids=dst, prompt_len=len(dst)))
    received = None
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for event in transport.poll(1):
            if isinstance(event, KVReceived):
                received = event
            elif isinstance(event, Inbound) and isinstance(event.msg, m.RoomStatus):
                end_s = now_s()
                if received is None or not received.complete:
                    raise RuntimeError(f"room {room}: incomplete transfer {received}")
                return end_s
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

    def run(self) -> list[tuple[int, dict[str, list[tuple[float, float]]]]]:
        ctx = mp.get_context("spawn")
        cmds, child_cmds = ctx.Pipe()
        proc = ctx.Process(target=sender_main, args=(child_cmds, self.args, self.pool_pages))
        proc.start()
        try:
            endpoints, raw_port, plain_endpoint = cmds.recv()
            self.plain = zmq.Context().socket(zmq.DEALER)
            self.plain.connect(plain_endpoint)
            self.transports = make_transports(self.args, self.pool, None)
            self.peers = {n: t.connect(endpoints[n]) for n, t in self.transports.items()}
            self.raw = socket.create_connection(("127.0.0.1", raw_port), timeout=TIMEOUT_S)
            self.cmds = cmds
            for name, transport in self.transports.items():
                backend = self.args.backend if name == "kv" else "nixl"
                self.timed(("handshake", name), handshake, transport, self.peers[name], backend)
            rows = [(size, self.measure(size * MIB)) for size in self.args.sizes_mib]
            cmds.send(None)
            proc.join(TIMEOUT_S)
            self.stats = self.transports["kv"].stats
            for transport in self.transports.values():
                transport.close()
            return rows
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()

    def measure(self, nbytes: int) -> dict[str, list[tuple[float, float]]]:
        """(seconds, CPU seconds of both processes) per timed round for each method; round i
        of every method ran back to back."""
        num_pages = nbytes // self.pool[0].nbytes
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in self.args.methods}
        for round_index in range(self.args.rounds + 1):  # round 0 warms up and checks
            for method, timing in self.one_round(nbytes, num_pages, check=round_index == 0):
                if round_index > 0:
                    samples[method].append(timing)
        return samples

    def timed(self, cmd: tuple, run: Callable[..., float], *args: Any) -> tuple[float, float]:
        """Start `cmd` on the sender, time `run(*args)` here; (seconds, CPU s of both sides)."""
        self.cmds.send(cmd)
        cpu_s = time.process_time()
        end_s = run(*args)
        cpu_s = time.process_time() - cpu_s
        sender_cpu_s, start_s = self.cmds.recv()
        return end_s - start_s, cpu_s + sender_cpu_s

    def one_round(self, nbytes: int, num_pages: int, check: bool):
        yield "raw", self.timed(("raw", nbytes), time_raw, self.raw, self.buffer, nbytes)
        yield "zmq_only", self.timed(("zmq_only", nbytes), time_zmq_only, self.plain, nbytes)
        for method in self.args.methods[2:]:
            name, pattern = (
                ("kv", method) if method in ("contiguous", "scattered") else (method, "")
            )
            src = page_ids(pattern, num_pages, self.pool_pages, seed=self.room)
            dst = page_ids(pattern, num_pages, self.pool_pages, seed=self.room + 1)
            self.room += 1
            args = (self.transports[name], self.peers[name], self.room, dst)
            yield method, self.timed(("kv", (name, src)), time_transport, *args)
            moved = name != "kv" or self.args.backend != "fake"
            if check and moved and not torch.equal(self.pool[dst], self.expected[src]):
                raise RuntimeError(f"{method} transfer of {nbytes} bytes: pages differ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per size")
    parser.add_argument("--frame-mib", type=float, default=TransportOptions.frame_nbytes / MIB)
    parser.add_argument("--backend", default="zmq", choices=["zmq", "fake"])
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument(
        "--no-data-channel", dest="data_channel", action="store_false", help="KV as ZeroMQ frames"
    )
    parser.add_argument(
        "--no-nixl", dest="nixl", action="store_false", help="leave out the NIXL columns"
    )
    args = Args(**vars(parser.parse_args(argv)))
    if args.nixl and nixl_missing() is not None:
        print(f"no NIXL columns: {nixl_missing()}")
        args = dataclasses.replace(args, nixl=False)
    torch.set_num_threads(args.torch_threads)
    page_nbytes = make_pool(1, seed=0)[0].nbytes
    pool_pages = max(args.sizes_mib) * MIB // page_nbytes * 5 // 4  # room to scatter
    receiver = Receiver(args, pool_pages)
    rows = receiver.run()
    over_data = receiver.stats.get("data_kv_bytes_in", 0) == receiver.stats.get("kv_bytes_in")
    print(
        f"KV transfer, 2 processes over loopback; page {page_nbytes // 1024} KiB, "
        f"frame {args.frame_mib:g} MiB, backend {args.backend}, {args.rounds} rounds, page bytes "
        f"{'on the data connection' if over_data else 'as ZeroMQ frames (some or all)'}"
    )
    print(report(rows, args.methods))


def report(
    rows: list[tuple[int, dict[str, list[tuple[float, float]]]]], methods: tuple[str, ...]
) -> str:
    """Per method: GB/s (median over rounds), "x raw" (median over rounds of raw time / its
    time, each pair measured back to back so drifts in machine load cancel), and CPU ms of
    both processes per GB (median): what bounds throughput once the cores are saturated."""
    names = {
        "raw": "raw TCP",
        "zmq_only": "ZeroMQ alone",
        "contiguous": "KV contiguous",
        "scattered": "KV scattered",
        "nixl_shm": "NIXL UCX shm",
        "nixl_tcp": "NIXL UCX tcp",
    }
    head = f"{'payload':>8} | " + " | ".join(
        f"{names[k]:>14} GB/s x raw cpu ms/GB" for k in methods
    )
    lines = [head, "-" * len(head)]
    for size, samples in rows:
        cells = []
        for method in methods:
            times = [t for t, _ in samples[method]]
            gbps = size * MIB / statistics.median(times) / 1e9
            ratio = statistics.median(
                raw / t for (raw, _), t in zip(samples["raw"], times, strict=True)
            )
            cpu_ms_per_gb = (
                statistics.median(c for _, c in samples[method]) * 1e3 * 1e9 / (size * MIB)
            )
            cells.append(f"{gbps:19.2f} {ratio:5.2f} {cpu_ms_per_gb:9.0f}")
        lines.append(f"{size:>5} MiB | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
