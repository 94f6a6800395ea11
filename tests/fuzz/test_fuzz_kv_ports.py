"""Property-based fuzzing of the KV ports: random, truncated, oversized and hostile frames on
a live prefill worker's ZeroMQ control socket and raw TCP data port, and hostile record
streams into a decode-side transport. Nothing crashes or sticks, pages stay where they
belong, and a real PD request is served right after."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import requests
import torch
import zmq
from hypothesis import example, given
from hypothesis import strategies as st

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import KVReceived, PeerLost, TransportOptions, make_transport
from pdserve.disagg.transfer.zmq import data_channel as dc
from pdserve.disagg.transfer.zmq.data_records import framed
from tests.disagg.conftest import PDFactory, Prefill
from tests.disagg.pd_driver import pd_generate, wait_idle
from tests.disagg.test_transfer_data_channel import PAGE_NBYTES, POOL_PAGES, RawPrefill
from tests.disagg.transfer_peer import make_pool, poll_until
from tests.helpers import ServerProcess

pytestmark = pytest.mark.fuzz

BODY = {
    "input_ids": list(range(20, 60)),
    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
}
U64 = st.integers(-(2**63), 2**64 - 1)
ROOMS = st.one_of(st.integers(0, 2**63 - 1), U64)
PAGE_IDS = st.lists(U64, max_size=12)
LAYOUTS = st.builds(
    m.KVLayout, page_size=U64, kv_dtype=st.text(max_size=8), num_layers=U64,
    num_kv_heads=U64, head_dim=U64, model_fingerprint=st.text(max_size=8),
)  # fmt: skip
MESSAGES = st.one_of(
    st.builds(m.Handshake, decode_id=st.text(max_size=8), layout=LAYOUTS, version=U64,
              backend=st.sampled_from(["zmq", "fake", "x"])),
    st.builds(m.HandshakeResult, ok=st.booleans(), error=st.none() | st.text(max_size=8)),
    st.builds(m.PageList, room=ROOMS, dst_page_ids=PAGE_IDS, prompt_len=U64),
    st.builds(m.KVHeader, room=ROOMS, frame_page_counts=PAGE_IDS, page_nbytes=U64, dst_page_ids=PAGE_IDS),
    st.builds(m.RoomStatus, room=ROOMS, ok=st.booleans(), error_status=U64),
    st.builds(m.Abort, room=ROOMS, reason=st.text(max_size=8)),
    st.builds(m.Ping, U64),
    st.builds(m.Pong, U64),
).map(m.encode)  # fmt: skip
DATA_MESSAGES = st.one_of(
    st.builds(dc.DataOffer, port=U64, token=st.binary(max_size=20)), st.just(dc.DataProbe())
).map(dc.encode)
FRAMES = st.one_of(
    st.binary(max_size=300),
    MESSAGES,
    DATA_MESSAGES,
    st.tuples(MESSAGES, st.integers(0, 40)).map(lambda mk: mk[0][: mk[1]]),  # truncated
    st.just(b"\x00" * (4 << 20)),  # oversized
)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Prefill, ServerProcess]]:
    factory = PDFactory()
    try:
        yield factory.prefill(1), factory.decode(1)
    finally:
        factory.stop_all()


def kv_endpoint(prefill: Prefill) -> str:
    url = f"http://127.0.0.1:{prefill.bootstrap_port}/route?prefill_dp_rank=0"
    return requests.get(url, timeout=10).json()["kv_endpoint"]


def real_layout(prefill: Prefill) -> m.KVLayout:
    info = requests.get(f"http://127.0.0.1:{prefill.bootstrap_port}/route", timeout=10).json()
    return m.KVLayout(**{name: info[name] for name in m.KVLayout.__struct_fields__})


def worker_pids(server: ServerProcess) -> list[int]:
    return requests.get(server.url + "/server_info", timeout=10).json()["worker_pids"]


@pytest.fixture(scope="module")
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


@given(messages=st.lists(st.lists(FRAMES, min_size=1, max_size=3), min_size=1, max_size=4))
def test_control_port_drops_garbage_frames(pair, zmq_ctx, messages):
    sock = dealer(zmq_ctx, kv_endpoint(pair[0]))
    try:
        for frames in messages:
            sock.send_multipart(frames)
    finally:
        sock.close()


@given(raw=st.binary(max_size=512))
def test_control_port_drops_raw_tcp_garbage(pair, raw):
    host, port = kv_endpoint(pair[0]).removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw)


def data_offer(ctx: zmq.Context, prefill: Prefill) -> dc.DataOffer:
    """A fresh handshake with the server's own layout; returns the data connection offer."""
    sock = dealer(ctx, kv_endpoint(prefill))
    try:
        sock.send(
            m.encode(m.Handshake(decode_id=f"fuzz-{os.getpid()}", layout=real_layout(prefill)))
        )
        assert sock.poll(10_000), "no answer to a valid handshake"
        msg = dc.decode(sock.recv())
        assert isinstance(msg, dc.DataOffer)
        return msg
    finally:
        sock.close()


@given(
    kind=st.sampled_from(["no_token", "token_then_junk", "truncated_token", "token_then_record"]),
    junk=st.binary(max_size=300),
    message=MESSAGES,
)
def test_data_port_closes_bad_connections(pair, zmq_ctx, kind, junk, message):
    offer = data_offer(zmq_ctx, pair[0])
    payload = {
        "no_token": junk,
        "token_then_junk": offer.token + junk,
        "truncated_token": offer.token[: len(junk) % dc.TOKEN_NBYTES],
        "token_then_record": offer.token + framed(message) + junk,
    }[kind]
    with socket.create_connection(("127.0.0.1", offer.port), timeout=10) as sock:
        sock.sendall(payload)


def test_prefill_still_serves_after_the_kv_garbage(pair):
    prefill, decode = pair
    pids = worker_pids(prefill.server)
    result = pd_generate(prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port)
    assert result.prefill.ok and result.decode.ok, (result.prefill.body, result.decode.body)
    assert worker_pids(prefill.server) == pids
    wait_idle([prefill.url, decode.url], timeout_s=20)


# -- hostile record streams into a decode-side transport ------------------------------
RECORDS = st.one_of(
    st.builds(
        lambda room, dst, counts, nbytes, tail: framed(m.encode(
            m.KVHeader(room=room, frame_page_counts=counts, page_nbytes=nbytes, dst_page_ids=dst)
        )) + tail,
        st.sampled_from([1, 2, 99]), st.lists(st.integers(-2, POOL_PAGES + 2), max_size=4),
        st.lists(st.integers(-1, 4), max_size=3), st.sampled_from([PAGE_NBYTES, 0, 7, 2**40]),
        st.binary(max_size=2 * PAGE_NBYTES),
    ),
    st.builds(lambda room, ok: framed(m.encode(m.RoomStatus(room=room, ok=ok))),
              st.sampled_from([1, 99]), st.booleans()),
    MESSAGES.map(framed),
    st.binary(max_size=64).map(framed),
    st.binary(max_size=64),
    st.sampled_from([dc.PREFIX.pack(2**32 - 1), dc.PREFIX.pack(0), b"\x01"]),
)  # fmt: skip
GRANTED = [2, 3]


@given(records=st.lists(RECORDS, min_size=1, max_size=5))
@example(records=[b""])  # closed before any byte: refused, prefill falls back to ZeroMQ
def test_decode_writes_only_granted_pages_whatever_the_stream(records):
    transport = make_transport(
        "zmq", make_pool(POOL_PAGES, seed=5), None,
        options=TransportOptions(zero_copy_min_nbytes=2 * PAGE_NBYTES),
    )  # fmt: skip
    raw = RawPrefill()
    try:
        before = transport.pool.clone()
        peer = raw.open(transport)
        transport.send(peer, m.PageList(room=1, dst_page_ids=GRANTED, prompt_len=2))
        try:
            raw.data.sendall(b"".join(records))
        except (BrokenPipeError, ConnectionResetError):
            pass  # decode already closed a stream it could not trust
        raw.data.close()
        # A stream that ends before any byte is prefill giving up on the connection (it
        # sends over ZeroMQ then): refused, not a lost peer. Anything else loses the peer.
        events = poll_until(
            transport,
            lambda ev: (
                any(isinstance(e, PeerLost) for e in ev)
                or transport.stats.get("data_channels_refused", 0) > 0
            ),
            10,
        )
    finally:
        raw.close()
        transport.close()
    others = [i for i in range(POOL_PAGES) if i not in GRANTED]
    assert torch.equal(transport.pool[others], before[others])
    assert all(e.room == 1 for e in events if isinstance(e, KVReceived))
