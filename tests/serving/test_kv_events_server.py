"""KV events from a real dp 2 server: a request's pages are `stored` on its rank with the
hashes a router computes (a salted request's under its salt's key); eviction and /flush_cache
publish `removed` and `cleared`; a subscriber that starts late, or loses a batch, converges to
the workers' real caches."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from pdserve.engine.page_hash import page_hashes, salted_seed
from pdserve.serving.cache_salt import salt_key
from tests.conftest import TINY_ARGS
from tests.helpers import http_json, launch_server, wait_until
from tests.kv_event_client import SubscriberThread, ask_replay, dump, events_since

PAGE = 16
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def prompt(n: int) -> list[int]:
    """70 tokens (4 full pages), different for every n from the first token on."""
    return [7 + n] + [5 + (i * 11 + n * 13) % 300 for i in range(69)]


@pytest.fixture(scope="module")
def server():
    # 24 pages per worker: a handful of 5-page requests make it evict.
    with launch_server([*TINY_ARGS, "--dp-size", "2", "--max-total-tokens", "384"]) as srv:
        yield srv


def info(url: str) -> dict:
    return http_json("GET", f"{url}/server_info")[1]


def generate(url: str, n: int, rank: int, **fields) -> None:
    body = {"input_ids": prompt(n), "sampling_params": GREEDY, "routed_dp_rank": rank, **fields}
    status, answer = http_json("POST", f"{url}/generate", body)
    assert status == 200, answer


def flush(url: str) -> None:
    assert http_json("POST", f"{url}/flush_cache")[0] == 200
    wait_until(lambda: not dump(url, 0) and not dump(url, 1), 30, "both caches empty")


def test_a_requests_pages_are_stored_on_its_rank_with_the_routers_hashes(server):
    flush(server.url)
    before = info(server.url)
    generate(server.url, 1, rank=1)
    expected = page_hashes(prompt(1), PAGE, before["kv_events_hash_seed"])
    assert len(expected) == 4
    wait_until(lambda: dump(server.url, 1) == set(expected), 30, "4 pages cached on rank 1")
    stored = [e for e in events_since(before, before["kv_events_seq"]) if e["type"] == "stored"]
    assert {e["dp_rank"] for e in stored} == {1}
    assert [h for e in stored for h in e["page_hashes"]] == expected
    assert stored[0]["parent_hash"] is None
    assert sum(e["num_tokens"] for e in stored) == 4 * PAGE
    assert not dump(server.url, 0)


def test_a_salted_requests_pages_are_stored_with_its_salted_hashes(server):
    """The same prompt unsalted and under a salt: two chains, the second the one a router
    computes from the seed salted with the key of the body's cache_salt (the worker gets the
    key alone: a MiB salt once went to it whole with each sequence of the request)."""
    flush(server.url)
    before = info(server.url)
    seed = before["kv_events_hash_seed"]
    salt = "tenant-a/" + "s" * 2**20
    generate(server.url, 2, rank=0)
    generate(server.url, 2, rank=0, cache_salt=salt)
    plain = page_hashes(prompt(2), PAGE, seed)
    salted = page_hashes(prompt(2), PAGE, salted_seed(seed, salt_key(salt)))
    assert not set(plain) & set(salted)
    wait_until(lambda: dump(server.url, 0) == {*plain, *salted}, 30, "both chains cached")
    stored = [e for e in events_since(before, before["kv_events_seq"]) if e["type"] == "stored"]
    assert [h for e in stored for h in e["page_hashes"]] == plain + salted


def test_eviction_is_removed_and_flush_is_cleared_on_every_rank(server):
    flush(server.url)
    before = info(server.url)
    for n in range(10, 18):  # 8 prompts of 4 cached pages each cannot all stay in 24 pages
        generate(server.url, n, rank=0)
    events = events_since(before, before["kv_events_seq"])
    removed = {h for e in events if e["type"] == "removed" for h in e["page_hashes"]}
    assert removed and all(e["dp_rank"] == 0 for e in events)
    assert not removed & dump(server.url, 0)
    mid = info(server.url)
    flush(server.url)
    cleared = [e for e in events_since(mid, mid["kv_events_seq"]) if e["type"] == "cleared"]
    assert {e["dp_rank"] for e in cleared} == {0, 1}


def test_a_late_subscriber_that_loses_a_batch_converges_to_the_real_caches(server):
    for n in range(20, 23):
        generate(server.url, n, rank=n % 2)
    sub = SubscriberThread(info(server.url))  # after traffic: starts from a snapshot
    try:
        wait_until(lambda: sub.sub.num_resyncs >= 1, 30, "the first snapshot")
        n = 30
        while sub.sub.num_live_batches == 0:  # the live stream reaches it (slow joiner)
            assert n < 60, "no live batch reached the subscriber"
            generate(server.url, n, rank=n % 2)
            n += 1
        sub.sub.drop_next = True
        for n in range(60, 64):
            generate(server.url, n, rank=n % 2)

        def converged() -> bool:
            return sub.ranks() == {0: dump(server.url, 0), 1: dump(server.url, 1)}

        wait_until(converged, 30, "the subscriber's index to equal both caches")
        assert sub.sub.num_replays >= 1
    finally:
        sub.close()


def test_the_replay_socket_outlives_a_client_that_is_not_a_req_socket(server):
    """Messages without REQ's empty delimiter frame are ignored, and the next REQ client is
    answered (before, the first such message ended the replay socket's loop)."""
    endpoint = info(server.url)["kv_events_replay_endpoint"]
    snapshot = msgspec.msgpack.encode({"op": "snapshot"})
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        dealer.send_multipart([b"", snapshot])  # as a REQ would: answered, so connected
        assert dealer.poll(10_000), "no answer to a well-formed question"
        dealer.recv_multipart()
        dealer.send(snapshot)  # no delimiter
        dealer.send_multipart([b"x", b"", snapshot])  # not an empty delimiter
        answer = ask_replay(endpoint, {"op": "snapshot"})
        assert answer["snapshot"]["seq"] == answer["seq"]
    finally:
        dealer.close()


@pytest.mark.parametrize("from_seq", [float("inf"), float("nan"), 1.5, "1", True])
def test_the_replay_socket_answers_a_question_that_is_not_an_integer_and_goes_on(server, from_seq):
    """The port is open to anyone who reaches it: `from_seq: inf` raised OverflowError in
    int(), which ended the replay loop for good (no answer to anyone after it, nothing
    logged), so a kv_aware router could no longer heal a gap."""
    endpoint = info(server.url)["kv_events_replay_endpoint"]
    answer = ask_replay(endpoint, {"op": "replay", "from_seq": from_seq})
    assert "from_seq must be an integer" in answer["error"], answer
    answer = ask_replay(endpoint, {"op": "replay", "from_seq": 1, "life": from_seq})
    assert "life must be an integer" in answer["error"], answer
    answer = ask_replay(endpoint, {"op": "snapshot"})
    assert answer["snapshot"]["seq"] == answer["seq"]


def test_the_event_endpoints_advertise_what_every_other_listener_does():
    """--advertise-host names the KV event sockets too (a router on another machine dials
    them), and a loopback bind advertises itself."""
    from pdserve.serving.kv_publisher import KVEventPublisher

    ctx = zmq.asyncio.Context()
    try:
        wild = KVEventPublisher(ctx, "0.0.0.0", (0, 0), 1, PAGE, 0, advertise_host="192.0.2.7")
        local = KVEventPublisher(ctx, "127.0.0.1", (0, 0), 1, PAGE, 0)
        for pub, host in ((wild, "192.0.2.7"), (local, "127.0.0.1")):
            assert pub.endpoint.startswith(f"tcp://{host}:"), pub.endpoint
            assert pub.replay_endpoint.startswith(f"tcp://{host}:"), pub.replay_endpoint
        # An IPv4 host keeps IPv4 sockets, as the KV transport's: with ZeroMQ's IPV6 option
        # on every bind they were IPv6 ones ("tcp://[::ffff:127.0.0.1]:P").
        for sock, host in ((wild._pub, "0.0.0.0"), (local._replay, "127.0.0.1")):
            assert sock.getsockopt_string(zmq.LAST_ENDPOINT).startswith(f"tcp://{host}:")
    finally:
        ctx.destroy(linger=0)


def test_an_asker_that_never_reads_its_answers_gets_few_queued():
    """It sends 100 snapshot questions and reads nothing: ZeroMQ queued up to 1000 answers
    for it (each a whole snapshot, 0.5 MB here); now a handful, the rest dropped."""
    from pdserve.engine.kv_events import PagesStored
    from pdserve.serving.kv_publisher import REPLAY_SEND_HWM, KVEventPublisher

    num_questions = 100

    async def scenario() -> int:
        ctx = zmq.asyncio.Context()
        publisher = KVEventPublisher(ctx, "127.0.0.1", (0, 0), 1, PAGE, 0)
        publisher.start()
        asker = ctx.socket(zmq.DEALER)
        try:
            publisher.publish(0, [PagesStored(list(range(1 << 62, (1 << 62) + 50_000)), None)])
            asker.setsockopt(zmq.RCVHWM, 1)
            asker.setsockopt(zmq.RCVBUF, 4096)
            asker.connect(publisher.replay_endpoint)
            for _ in range(num_questions):
                await asker.send_multipart([b"", msgspec.msgpack.encode({"op": "snapshot"})])
            await wait_until_async(lambda: publisher.num_answers == num_questions)
            num_answers = 0
            while await asker.poll(1000):  # what was sent arrives at once over loopback
                await asker.recv_multipart()
                num_answers += 1
            return num_answers
        finally:
            asker.close(linger=0)
            await publisher.stop()
            ctx.destroy(linger=0)

    num_answers = asyncio.run(scenario())
    # The queue, and what the sockets' kernel buffers hold of the 0.5 MB answers.
    assert 1 <= num_answers <= REPLAY_SEND_HWM + 16, num_answers


async def wait_until_async(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the publisher"
        await asyncio.sleep(0.01)  # polling interval of a deadline-bounded wait
