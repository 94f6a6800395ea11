"""A decode room that pinned cached pages and waits for the rest of its KV: an abort, a
client hanging up, a failed prefill leg, a deadline, or a cache flush under load leaves no
page used, no room and no pin behind (every cached page evictable again)."""

from __future__ import annotations

import concurrent.futures
import random

import msgspec
import pytest
import requests
import zmq

from pdserve.disagg import messages as m
from pdserve.engine.kv_layout import KVLayout
from tests.disagg.pd_driver import get_load, pd_generate, pd_generate_async, run_many, wait_idle
from tests.helpers import wait_until
from tests.serving.test_page_accounting import raw_post

PAGE = 16
KV_WAIT_S = 6.0


@pytest.fixture(scope="module")
def pair(pd_module):
    prefill = pd_module.prefill(1)
    decode = pd_module.decode(1, ["--kv-wait-timeout-s", str(KV_WAIT_S)])
    return prefill, decode


def _body(ids: list[int], **extra) -> dict:
    sampling = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    return {"input_ids": ids, "sampling_params": sampling, **extra}


def _leg(prefill, room: int, body: dict) -> dict:
    return dict(
        body, bootstrap_host="127.0.0.1", bootstrap_port=prefill.bootstrap_port, bootstrap_room=room
    )


def _post_async(url: str, body: dict) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(requests.post, url + "/generate", json=body, timeout=60)
    pool.shutdown(wait=False)
    return future


def _cached_prefix(pair, seed: int) -> list[int]:
    """A prompt of 4 full pages that decode holds in its cache (after one request)."""
    prefill, decode = pair
    prompt = [random.Random(seed).randrange(3, 250) for _ in range(4 * PAGE + 1)]
    result = pd_generate(
        prefill.url, decode.url, _body(prompt), bootstrap_port=prefill.bootstrap_port
    )
    assert result.decode.ok, result.decode.error
    return prompt[: 4 * PAGE]


def _pinned(url: str) -> bool:
    """A room waits for its KV there with cached pages pinned. (Pinned pages alone can still
    be the previous request's, not yet released: the abort then raced the new request.)"""
    load = get_load(url)[0]
    pinned = load["num_evictable_pages"] < load["num_cached_pages"]
    return load["num_disagg_rooms"] > 0 and load["num_used_pages"] > 0 and pinned


def _assert_nothing_pinned(prefill, decode) -> None:
    wait_idle([prefill.url, decode.url], timeout_s=20)
    for load in get_load(decode.url):
        assert load["num_evictable_pages"] == load["num_cached_pages"]


def _start_pinned_room(pair, seed: int, room: int, **extra) -> concurrent.futures.Future:
    """Decode's leg of a prompt that extends a cached prefix, without its prefill leg: the
    room pins the prefix and waits for the KV of the rest."""
    prefill, decode = pair
    prompt = _cached_prefix(pair, seed) + [5] * (PAGE + 3)
    future = _post_async(decode.url, _leg(prefill, room, _body(prompt, **extra)))
    wait_until(lambda: _pinned(decode.url), 20, "decode to pin the cached prefix")
    return future


def test_abort_while_pinned_frees_the_pins(pair):
    prefill, decode = pair
    future = _start_pinned_room(pair, seed=1, room=101, rid="pinned-abort")
    resp = requests.post(decode.url + "/abort_request", json={"rid": "pinned-abort"}, timeout=10)
    assert resp.json()["num_aborted"] == 1
    answer = future.result(timeout=30)
    assert answer.status_code != 200 or answer.json()["meta_info"]["finish_reason"]["type"] == (
        "abort"
    )
    _assert_nothing_pinned(prefill, decode)


def test_deadline_while_pinned_frees_the_pins(pair):
    prefill, decode = pair
    future = _start_pinned_room(pair, seed=2, room=102)
    answer = future.result(timeout=30)
    assert answer.status_code == 504, answer.text
    assert f"timed out after {KV_WAIT_S:g}s waiting for the KV" in answer.text
    _assert_nothing_pinned(prefill, decode)


def test_client_hanging_up_while_pinned_frees_the_pins(pair):
    prefill, decode = pair
    prompt = _cached_prefix(pair, seed=3) + [6] * (PAGE + 3)
    sock = raw_post(decode.url, "/generate", _leg(prefill, 103, _body(prompt)))
    wait_until(lambda: _pinned(decode.url), 20, "decode to pin the cached prefix")
    sock.close()
    _assert_nothing_pinned(prefill, decode)


def test_failed_prefill_leg_while_pinned_frees_the_pins(pair):
    prefill, decode = pair
    future = _start_pinned_room(pair, seed=4, room=104)
    # The prefill leg of that room has another prompt: prefill computes it, refuses to send
    # pages that do not fit decode's page list, and fails the room on both sides at once.
    other = _cached_prefix(pair, seed=4) + [9] * (2 * PAGE)
    prefill_answer = requests.post(
        prefill.url + "/generate", json=_leg(prefill, 104, _body(other)), timeout=30
    )
    assert prefill_answer.status_code == 500, prefill_answer.text
    answer = future.result(timeout=KV_WAIT_S - 1)
    assert answer.status_code == 500, answer.text
    assert "decode expects 83 prompt tokens, prefill has 96" in answer.text
    _assert_nothing_pinned(prefill, decode)


def test_flush_cache_under_load_on_decode_keeps_answers_right(pair):
    prefill, decode = pair
    rng = random.Random(5)
    system = [rng.randrange(3, 250) for _ in range(6 * PAGE)]
    bodies = [_body(system + [rng.randrange(3, 250) for _ in range(9 + i)]) for i in range(12)]

    def run(session):
        return [
            pd_generate_async(
                session, prefill.url, decode.url, b, bootstrap_port=prefill.bootstrap_port
            )
            for b in bodies
        ]

    before = [r.decode.body["output_ids"] for r in run_many(run)]
    flushes = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_many, run)
        while not load.done():
            assert requests.post(decode.url + "/flush_cache", timeout=10).status_code == 200
            flushes += 1
        results = load.result()
    assert flushes > 0
    assert [r.decode.body["output_ids"] for r in results] == before
    _assert_nothing_pinned(prefill, decode)


def _next_channel_msg(dealer: zmq.Socket) -> m.ChannelMsg:
    """The next KV channel message (the data connection's own set-up messages skipped)."""
    while True:
        assert dealer.poll(10_000), "no message from prefill within 10 s"
        try:
            return m.decode(dealer.recv())
        except msgspec.ValidationError:  # a DataOffer: not a channel message
            continue


def test_a_decode_of_protocol_version_1_is_refused_and_sent_no_pages(pair):
    """Version 1 decode servers ask for every page of the prompt: prefill must never take
    their page lists for delta ones."""
    prefill, _ = pair
    route = f"http://127.0.0.1:{prefill.bootstrap_port}/route?prefill_dp_rank=0"
    endpoint = requests.get(route, timeout=5).json()["kv_endpoint"]
    layout = KVLayout(
        page_size=PAGE,
        kv_dtype="float32",
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        model_fingerprint="any",
    )
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send(m.encode(m.Handshake(decode_id="old-decode", layout=layout, version=1)))
        answer = _next_channel_msg(dealer)
        assert isinstance(answer, m.HandshakeResult) and not answer.ok
        assert f"protocol version mismatch: decode=1 prefill={m.PROTOCOL_VERSION}" in answer.error
        dealer.send(m.encode(m.PageList(room=7, dst_page_ids=[1, 2], prompt_len=20)))
        status = _next_channel_msg(dealer)
        error = "page list before handshake"
        assert status == m.RoomStatus(room=7, ok=False, error=error, handshake_needed=True)
    finally:
        ctx.destroy(linger=0)
