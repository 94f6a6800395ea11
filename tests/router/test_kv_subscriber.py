"""The router's KV event follower against a server's real publisher (its replay socket) and
a live socket that also carries garbage: undecodable bytes, a batch that is not an object,
a bad sequence number, malformed events. The follower resynchronises and keeps following;
before, the first of them ended it and froze the worker's index for good."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine.kv_events import CacheEvent, PagesRemoved, PagesStored
from pdserve.router import kv_subscriber
from pdserve.router.kv_follow import KVFollower
from pdserve.router.kv_index import KVIndex, WorkerCache
from pdserve.router.kv_policy import KVAware
from pdserve.router.kv_subscriber import KVSubscriber
from pdserve.serving.cache_salt import salt_key
from pdserve.serving.kv_event_stream import KVEventStream
from pdserve.serving.kv_publisher import MAX_RECENT_BATCHES, KVEventPublisher
from tests.router.test_policy import make_workers

PAGE_SIZE, HASH_SEED = 16, 7
DEADLINE_S = 20.0
POLL_S = 0.02


class LiveRelay:
    """The publisher's batches, sent on a live socket the test also writes garbage to."""

    def __init__(self, ctx: zmq.asyncio.Context, publisher: KVEventPublisher):
        self.publisher = publisher
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    async def publish(self, dp_rank: int, events: list[CacheEvent]) -> bytes:
        self.publisher.publish(dp_rank, events)
        stream = self.publisher.stream
        data = msgspec.msgpack.encode(stream.replay(stream.seq)["batches"][-1])
        await self.sock.send(data)
        return data


async def wait_for(condition, what: str, resend: tuple[zmq.asyncio.Socket, bytes] | None = None):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if resend is not None:  # a PUB drops what it sends before the subscription lands
            await resend[0].send(resend[1])
        await asyncio.sleep(POLL_S)


def cached(cache: WorkerCache) -> dict[int, set[int]]:
    return {rank: set(hashes) for rank, hashes in cache.ranks.items() if hashes}


@contextlib.asynccontextmanager
async def relayed_follower(dp_size: int):
    """A real publisher, its live batches relayed (`LiveRelay`), and a subscriber following
    them into a cache; all stopped on the way out."""
    ctx = zmq.asyncio.Context()
    publisher = KVEventPublisher(ctx, "127.0.0.1", (0, 0), dp_size, PAGE_SIZE, HASH_SEED)
    publisher.start()
    relay = LiveRelay(ctx, publisher)
    cache = WorkerCache(PAGE_SIZE, HASH_SEED)
    sub = KVSubscriber(ctx, cache, relay.endpoint, publisher.replay_endpoint)
    sub.start()
    try:
        yield publisher, relay, cache
    finally:
        await sub.stop()
        await publisher.stop()
        relay.sock.close()
        ctx.destroy(linger=0)


async def follow_through_garbage() -> None:
    async with relayed_follower(2) as (publisher, relay, cache):
        first = await relay.publish(0, [PagesStored([1, 2], None)])
        await wait_for(lambda: cache.last_seq == 1, "the first live batch", (relay.sock, first))
        encode = msgspec.msgpack.encode
        for garbage in (
            b"\xc1 not msgpack",
            encode([1, 2]),
            encode({"seq": "two", "events": []}),
            encode({"seq": 2, "events": 5}),
            encode({"seq": 2, "events": [{"type": "stored", "dp_rank": 0, "page_hashes": 9}]}),
        ):
            await relay.sock.send(garbage)
        await relay.publish(1, [PagesStored([3], None)])
        await relay.publish(0, [PagesRemoved([1])])
        stream = publisher.stream
        expected = {rank: c for rank, c in enumerate(stream.cached) if c}
        assert expected == {0: {2}, 1: {3}}
        await wait_for(
            lambda: cache.last_seq == stream.seq and cached(cache) == expected,
            "the follower to resynchronise after garbage",
        )
        last = await relay.publish(1, [PagesStored([4], 3)])  # and it still follows
        await wait_for(lambda: cache.last_seq == stream.seq, "a batch after the resync")
        assert cached(cache) == {0: {2}, 1: {3, 4}}, last


def test_garbage_on_the_live_socket_resynchronises_and_following_goes_on():
    asyncio.run(follow_through_garbage())


async def follow_a_restart_with_no_live_batch() -> None:
    """The server starts again on the same ports (a new stream of a new life behind the same
    replay socket) and publishes as many batches as the old life had while the subscriber
    hears none live: its idle probe asks for the batches past the old life's last seq."""
    async with relayed_follower(1) as (publisher, relay, cache):
        first = await relay.publish(0, [PagesStored([1, 2], None)])
        await wait_for(lambda: cache.last_seq == 1, "the first live batch", (relay.sock, first))
        old_life = cache.life
        reborn = KVEventStream(1, PAGE_SIZE, MAX_RECENT_BATCHES, life=old_life + 1)
        publisher.stream = reborn
        reborn.add(0, [PagesStored([3], None)], time.time())  # seq 1 again, never heard
        await wait_for(
            lambda: cache.life == reborn.life and cached(cache) == {0: {3}},
            "the follower to take the new life's pages",
        )


async def follow_a_restart_on_the_same_ports() -> None:
    ctx = zmq.asyncio.Context()
    publisher = KVEventPublisher(ctx, "127.0.0.1", (0, 0), 1, PAGE_SIZE, HASH_SEED)
    publisher.start()
    publisher.publish(0, [PagesStored([1, 2], None)])
    index, url = KVIndex(), "http://127.0.0.1:1"
    follower = KVFollower(index)
    try:
        await follower.follow(url, {**publisher.info(), "page_size": PAGE_SIZE})
        await wait_for(lambda: index.workers[url].last_seq == 1, "the first snapshot")
        assert follower.follows(url)
        life = index.workers[url].life
        publisher.stream = KVEventStream(1, PAGE_SIZE, MAX_RECENT_BATCHES, life=life + 1)
        publisher.publish(0, [PagesStored([3], None)])
        await wait_for(lambda: index.workers[url].life == life + 1, "the new life's snapshot")
        assert not follower.follows(url)
    finally:
        await follower.stop()
        await publisher.stop()
        ctx.destroy(linger=0)


def test_a_server_started_again_on_the_same_ports_is_no_longer_followed_as_it_was(monkeypatch):
    """Its /server_info must be read again: started with another --page-size or model, it
    hashes its pages otherwise. The follower went on with the old page size and seed, and
    the index matched no prompt on that server again (until it failed its health checks)."""
    monkeypatch.setattr(kv_subscriber, "IDLE_PROBE_S", 0.1)
    asyncio.run(follow_a_restart_on_the_same_ports())


def test_a_restart_heard_only_by_the_idle_probe_resynchronises(monkeypatch):
    """Before, the probe's replay from the old life's seq + 1 was this life's next batch:
    an empty answer, and the index kept the old life's pages until the server's next batch
    (a decode server holding nothing was sent local prefills meanwhile)."""
    monkeypatch.setattr(kv_subscriber, "IDLE_PROBE_S", 0.1)
    asyncio.run(follow_a_restart_with_no_live_batch())


async def follow_over_ipv6() -> None:
    ctx = zmq.asyncio.Context()
    publisher = KVEventPublisher(ctx, "::1", (0, 0), 1, PAGE_SIZE, HASH_SEED)
    publisher.start()
    assert publisher.endpoint.startswith("tcp://[::1]:"), publisher.endpoint
    publisher.publish(0, [PagesStored([1, 2], None)])
    cache = WorkerCache(PAGE_SIZE, HASH_SEED)
    sub = KVSubscriber(ctx, cache, publisher.endpoint, publisher.replay_endpoint)
    sub.start()
    try:
        await wait_for(lambda: cached(cache) == {0: {1, 2}}, "the snapshot over IPv6")
        page = 3
        while sub.num_live_batches == 0:  # a PUB drops what it sends before the SUB is in
            publisher.publish(0, [PagesStored([page], page - 1)])
            page += 1
            await wait_for(lambda: cache.last_seq == publisher.stream.seq, "the live batch")
    finally:
        await sub.stop()
        await publisher.stop()
        ctx.destroy(linger=0)


def test_a_server_on_an_ipv6_host_publishes_and_is_followed():
    """`pdserve serve --host ::1` (or `::`) failed to start: ZeroMQ took "tcp://::1" for no
    device at all (the KV event sockets are opened on every role, colocated too)."""
    asyncio.run(follow_over_ipv6())


async def follow_a_seed_past_64_bits() -> None:
    """Two servers' real publishers, one advertising a seed no page hash can be chained
    from; a salted prompt is then scored over both."""
    ctx = zmq.asyncio.Context()
    publishers = [
        KVEventPublisher(ctx, "127.0.0.1", (0, 0), 1, PAGE_SIZE, seed)
        for seed in (HASH_SEED, 1 << 64)
    ]
    index = KVIndex()
    follower = KVFollower(index)
    workers = make_workers(2)
    try:
        for publisher, worker in zip(publishers, workers, strict=True):
            publisher.start()
            await follower.follow(worker.url, {**publisher.info(), "page_size": PAGE_SIZE})
        await wait_for(
            lambda: all(c.last_seq is not None for c in index.workers.values()),
            "every followed server's snapshot",
        )
        prompt = list(range(3 * PAGE_SIZE))
        best = KVAware(index, per_rank=False).score(workers, prompt, salt_key("tenant"))
        assert best.matched_tokens == 0
        assert list(index.workers) == [workers[0].url]  # the other is routed by load
    finally:
        await follower.stop()
        for publisher in publishers:
            await publisher.stop()
        ctx.destroy(linger=0)


def test_a_hash_seed_past_64_bits_is_not_followed_and_salted_prompts_still_route():
    """A worker's /server_info is not the router's to trust: following one that advertised
    `kv_events_hash_seed` 2**64 made every salted request of its role fail in the router
    (OverflowError packing the salted seed), whichever worker it was meant for."""
    asyncio.run(follow_a_seed_past_64_bits())
