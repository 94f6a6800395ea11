"""A KV transport peer in its own process, for the transfer tests.

`--backend`: any of `make_transport`'s. `--listen`: a prefill-like peer. It prints its endpoint, answers Handshake and Ping, answers
each PageList by sending `source_pages(room, ...)` into the listed pages, and reports each
finished SendHandle with `Pong(seq=room)`; with `--exit-after-send` it exits as soon as its
first send has started, with `--freeze-after-send` it stops polling then (tests kill it). `--connect EP`: a decode-like peer that connects, sends a Ping and
idles (tests kill it); with `--ask-pages N` it handshakes instead, sends a PageList for room 1
and pages 0..N-1, then stops reading. Either exits after `--idle-exit-s` without messages.
Tests run it through `start_peer`, which waits for readiness and always kills it. Also the
in-process helpers of those tests (`poll_until`, `worker_turn`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Event, Inbound, KVTransport, SendHandle, make_transport
from pdserve.disagg.transfer.base import TransportOptions
from pdserve.disagg.transfer.zmq.transport import ZmqTransport
from pdserve.serving.worker_io import output_to_msg

PAGE_SHAPE = (2, 2, 4, 2, 8)  # layers, k/v, tokens, kv heads, head dim: 1 KiB of fp32
LAYOUT = m.KVLayout(
    page_size=4, kv_dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, model_fingerprint="x"
)


def make_pool(num_pages: int, seed: int) -> torch.Tensor:
    return torch.rand((num_pages, *PAGE_SHAPE), generator=torch.Generator().manual_seed(seed))


class SmallBuffers(ZmqTransport):
    """The zmq transport with TCP buffers of 64 KiB: a send that decode does not read backs
    up within the first MiB, whatever the kernel's autotuning would allow."""

    def _make_socket(self) -> zmq.Socket:
        sock = super()._make_socket()
        sock.setsockopt(zmq.SNDBUF, 64 << 10)
        sock.setsockopt(zmq.RCVBUF, 64 << 10)
        return sock


def backed_up_options(data_channel: bool) -> TransportOptions:
    """Frames of 64 KiB sent zero-copy from the pool, one message queued in ZeroMQ each
    way: with `SmallBuffers`, a send decode does not read backs up after a few frames."""
    return TransportOptions(
        data_channel=data_channel,
        frame_nbytes=64 << 10,
        zero_copy_min_nbytes=16 << 10,
        send_hwm_msgs=1,
        recv_hwm_msgs=1,
    )


def source_pages(room: int, num_pages: int, pool_pages: int) -> list[int]:
    """room % 3 == 0: one run of pages; 1: scattered single pages; 2: scattered pairs."""
    rng = np.random.default_rng(room)
    if room % 3 == 0:
        start = room % (pool_pages - num_pages + 1)
        return list(range(start, start + num_pages))
    if room % 3 == 1:
        return rng.permutation(pool_pages)[:num_pages].tolist()
    pairs = rng.permutation(pool_pages // 2)[: (num_pages + 1) // 2]
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)[:num_pages].tolist()


def serve(
    transport: KVTransport,
    pool_pages: int,
    idle_exit_s: float,
    exit_after_send: bool,
    freeze_after_send: bool = False,
):
    handles: list[tuple[str, SendHandle]] = []
    last_message = time.monotonic()
    while time.monotonic() - last_message < idle_exit_s:
        for event in transport.poll(20):
            last_message = time.monotonic()
            if isinstance(event, Inbound):
                handles += answer(transport, event, pool_pages)
            if handles and exit_after_send:
                os._exit(0)  # no close: what the kernel holds still goes out, then the end
            if handles and freeze_after_send:
                transport.poll(0)  # what the send queued goes out (NIXL: the batch)
                time.sleep(3600)  # never polled again: the test kills it
        for peer, handle in [(p, h) for p, h in handles if h.done()]:
            handles.remove((peer, handle))
            if handle.error is None:
                transport.send(peer, m.Pong(seq=handle.room))


def answer(transport: KVTransport, event: Inbound, pool_pages: int) -> list[tuple[str, SendHandle]]:
    msg = event.msg
    if isinstance(msg, m.Handshake):
        error = transport.accept_peer_meta(event.peer, msg.transfer_meta)
        meta = transport.handshake_meta()
        transport.send(
            event.peer, m.HandshakeResult(ok=error is None, error=error, transfer_meta=meta)
        )
    elif isinstance(msg, m.Ping):
        transport.send(event.peer, m.Pong(seq=msg.seq))
    elif isinstance(msg, m.PageList):
        src = source_pages(msg.room, len(msg.dst_page_ids), pool_pages)
        then = m.RoomStatus(room=msg.room, ok=True, first=m.FirstToken(room=msg.room, token_id=7))
        return [(event.peer, transport.send_kv(event.peer, msg.room, src, msg.dst_page_ids, then))]
    return []


@contextlib.contextmanager
def start_peer(*args: str, timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run this module with `args`; yields (process, endpoint or "None") once it is ready.
    The process is killed by its pid when the block exits, pass or fail."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.disagg.transfer_peer", *args],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _ready_line(proc, timeout_s).split()[1]
    finally:
        proc.kill()
        proc.wait(timeout=timeout_s)
        proc.stdout.close()


def ask_and_stop_reading(transport: KVTransport, endpoint: str, num_pages: int) -> None:
    """Handshake, ask for pages 0..num_pages-1 for room 1, then never poll again."""
    peer = transport.connect(endpoint)
    transport.send(peer, m.Handshake(decode_id="transfer_peer", layout=LAYOUT))
    poll_until(transport, lambda ev: any(isinstance(e, Inbound) for e in ev), timeout_s=60)
    pages = list(range(num_pages))
    transport.send(peer, m.PageList(room=1, dst_page_ids=pages, prompt_len=num_pages))
    time.sleep(3600)


def _ready_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The peer's `ready` line. A thread reads its output to the end (nothing fills the
    pipe): a select on the pipe missed a `ready` that came in one read with a log line
    before it (NIXL logs to stdout), left in the reader's buffer where select cannot see it."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"transfer peer not ready within {timeout_s}s") from None
        if line.startswith("ready "):
            return line
        if not line:
            raise RuntimeError(f"transfer peer exited with {proc.wait()}")


def poll_until(
    transport: KVTransport, done: Callable[[list[Event]], bool], timeout_s: float = 20.0
) -> list[Event]:
    """Poll `transport` until `done(events so far)`; AssertionError at the deadline."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        events += transport.poll(20)
    return events


def worker_turn(engine, hooks) -> list:
    """One turn of a worker's loop around `engine` and its PD `hooks`; returns the answers."""
    outputs = hooks.poll(time.monotonic())
    if engine.has_work():
        steps = engine.step()
        held = {o.rid: o.held_page_ids for o in steps if o.held_page_ids is not None}
        outputs += hooks.after_step(time.monotonic(), [output_to_msg(o) for o in steps], held)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="zmq")
    parser.add_argument("--listen", action="store_true")
    parser.add_argument("--connect", default=None)
    parser.add_argument("--pool-pages", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--frame-nbytes", type=int, default=4096)
    parser.add_argument("--zero-copy-min-nbytes", type=int, default=2048)
    parser.add_argument("--idle-exit-s", type=float, default=60.0)
    parser.add_argument("--exit-after-send", action="store_true")
    parser.add_argument("--freeze-after-send", action="store_true")
    parser.add_argument("--ask-pages", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pool = make_pool(args.pool_pages, args.seed)
    options = TransportOptions(
        frame_nbytes=args.frame_nbytes, zero_copy_min_nbytes=args.zero_copy_min_nbytes
    )
    host = "127.0.0.1" if args.listen else None
    transport = make_transport(args.backend, pool, host, options=options)
    if args.connect and args.ask_pages is None:
        peer = transport.connect(args.connect)
        transport.send(peer, m.Ping(seq=1))
    print(f"ready {transport.endpoint}", flush=True)
    try:
        if args.ask_pages is not None:
            ask_and_stop_reading(transport, args.connect, args.ask_pages)
        serve(
            transport,
            args.pool_pages,
            args.idle_exit_s,
            args.exit_after_send,
            args.freeze_after_send,
        )
    finally:
        transport.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
