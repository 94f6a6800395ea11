"""Publishes the server's KV cache events on ZeroMQ (front-end process, asyncio).

One PUB socket per server carries every rank's batches (`KVEventStream`); a ROUTER socket
answers `{"op": "replay", "from_seq": n, "life": l}` with the batches since n (or a snapshot,
also when `l` is not this start's) and
`{"op": "snapshot"}` with every rank's cached pages. Publishing never blocks the worker
link: batches wait in a bounded queue, and a full queue drops (counted), which a subscriber
sees as a gap and heals by replay or snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pdserve import netaddr
from pdserve.engine.kv_events import CacheEvent
from pdserve.serving.kv_event_stream import KVEventStream

logger = logging.getLogger(__name__)

MAX_QUEUED_BATCHES = 1024
MAX_RECENT_BATCHES = 4096
# Answers queued for one asker: a REQ client waits for each, so more are dropped. ZeroMQ's
# default (1000) let an asker that sends and never reads hold 1000 snapshots in memory.
REPLAY_SEND_HWM = 4
MAX_QUESTION_NBYTES = 64 << 10  # a question is a few bytes; a longer one drops its sender
PORT_FLAGS = ("--kv-events-port", "--kv-events-replay-port")  # in the order of `ports`


class KVEventPublisher:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        host: str,
        ports: tuple[int, int],
        dp_size: int,
        page_size: int,
        hash_seed: int,
        advertise_host: str | None = None,
    ):
        life = random.SystemRandom().getrandbits(63)
        self.stream = KVEventStream(dp_size, page_size, MAX_RECENT_BATCHES, life)
        self.hash_seed = hash_seed
        self.num_dropped_batches = 0
        self.num_answers = 0  # questions answered on the replay socket
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED_BATCHES)
        self._pub = ctx.socket(zmq.PUB)
        self._replay = ctx.socket(zmq.ROUTER)
        for sock in (self._pub, self._replay):
            sock.setsockopt(zmq.LINGER, 0)
            # An IPv6 --host needs it; an IPv4 one keeps an IPv4 listener (with it set,
            # ZeroMQ made 0.0.0.0 an IPv6 socket), as the KV transport's does.
            sock.setsockopt(zmq.IPV6, int(netaddr.family(host) == socket.AF_INET6))
        self._replay.setsockopt(zmq.SNDHWM, REPLAY_SEND_HWM)
        self._replay.setsockopt(zmq.MAXMSGSIZE, MAX_QUESTION_NBYTES)
        pub_port, replay_port = (
            self._bind(sock, host, port, flag)
            for sock, port, flag in zip((self._pub, self._replay), ports, PORT_FLAGS, strict=True)
        )
        name = netaddr.url_host(netaddr.advertised_host(host, advertise_host))
        self.endpoint = f"tcp://{name}:{pub_port}"  # advertised as every other listener
        self.replay_endpoint = f"tcp://{name}:{replay_port}"
        self._tasks: list[asyncio.Task] = []

    @staticmethod
    def _bind(sock: zmq.Socket, host: str, port: int, flag: str) -> int:
        """The port bound; OSError naming the flag when it cannot be (taken, say), which
        the server reports as a failed start like a taken HTTP port, not a traceback."""
        address = f"tcp://{netaddr.url_host(host)}"
        try:
            if port == 0:
                return sock.bind_to_random_port(address)
            sock.bind(f"{address}:{port}")
        except zmq.ZMQError as exc:
            raise netaddr.cannot_listen(flag, port, f"{address}:{port}", exc) from exc
        return port

    def info(self) -> dict[str, Any]:
        """What /server_info advertises: a router hashes prompts with `hash_seed`."""
        return {
            "kv_events_endpoint": self.endpoint,
            "kv_events_replay_endpoint": self.replay_endpoint,
            "kv_events_hash_seed": self.hash_seed,
            "kv_events_seq": self.stream.seq,
        }

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._serve())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pub.close()
        self._replay.close()

    def publish(self, dp_rank: int, events: list[CacheEvent]) -> None:
        batch = self.stream.add(dp_rank, events, time.time())
        try:
            self._queue.put_nowait(msgspec.msgpack.encode(batch))
        except asyncio.QueueFull:
            self.num_dropped_batches += 1

    async def _send_loop(self) -> None:
        while True:
            data = await self._queue.get()
            await self._pub.send(data)  # PUB drops for a slow subscriber rather than block

    async def _serve(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or frames[1]:  # not a REQ client's [identity, "", request]
                logger.warning("KV events replay socket: ignored a %d-frame message", len(frames))
                continue
            ident, _, request = frames
            try:
                answer = self._answer(request)
            except Exception:  # anyone who reaches the port may ask: the loop must go on
                logger.exception("KV events replay socket: a question failed")
                answer = {"error": "internal error"}
            await self._replay.send_multipart([ident, b"", msgspec.msgpack.encode(answer)])
            self.num_answers += 1
            # Questions already queued are read without a pause: one asker's burst held the
            # event loop (the HTTP API, the worker links) until it had all been answered.
            await asyncio.sleep(0)

    def _answer(self, request: bytes) -> dict[str, Any]:
        try:
            msg = msgspec.msgpack.decode(request)
            op = msg["op"]
            if op == "snapshot":
                return {"seq": self.stream.seq, "snapshot": self.stream.snapshot()}
            if op == "replay":
                from_seq, life = msg["from_seq"], msg.get("life")
                if type(from_seq) is not int:  # int(inf) raised OverflowError and ended the loop
                    return {"error": f"bad request: from_seq must be an integer, got {from_seq!r}"}
                if life is not None and type(life) is not int:
                    return {"error": f"bad request: life must be an integer, got {life!r}"}
                return self.stream.replay(from_seq, life)
            return {"error": f"unknown op {op!r}"}
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            return {"error": f"bad request: {exc!r}"}
