"""PD under a disagg secret, with real servers: the same secret on both sides gives the
colocated tokens; a wrong or missing secret fails the request at once with the reason,
is counted on prefill, and leaves no page behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from pdserve.disagg import kv_auth
from pdserve.disagg import messages as m
from pdserve.engine.kv_layout import KVLayout
from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import metric_value, pd_generate, wait_idle
from tests.helpers import http_json

SECRET = "s3cret-shared"
# Prefill's wait for a page list that a refused decode never sends: three tests wait it
# out; the same-secret test's page list comes in well under a second.
PREFILL_DEADLINE_S = 3.0
BODY = {"input_ids": list(range(5, 60)), "sampling_params": {"max_new_tokens": 5, "temperature": 0}}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict]:
    factory = PDFactory()
    try:
        prefill = factory.prefill(
            args=["--disagg-secret", SECRET, "--bootstrap-timeout-s", str(PREFILL_DEADLINE_S)]
        )
        yield {
            "prefill": prefill,
            "decode": factory.decode(env={"PDSERVE_DISAGG_SECRET": SECRET}),
            "decode_wrong": factory.decode(args=["--disagg-secret", "not-it"]),
            "decode_none": factory.decode(),
        }
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def colocated_tokens(tiny_server) -> list[int]:
    status, answer = http_json("POST", tiny_server.url + "/generate", BODY)
    assert status == 200, answer
    return answer["output_ids"]


def _run(servers: dict, decode: str):
    prefill = servers["prefill"]
    return pd_generate(
        prefill.url, servers[decode].url, BODY, bootstrap_port=prefill.bootstrap_port
    )


def test_the_same_secret_on_both_sides_gives_the_colocated_tokens(servers, colocated_tokens):
    result = _run(servers, "decode")
    assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
    assert result.decode.body["output_ids"] == colocated_tokens
    wait_idle([servers["prefill"].url, servers["decode"].url])


@pytest.mark.parametrize(
    "decode, reason", [("decode_wrong", "secrets differ"), ("decode_none", "missing proof")]
)
def test_a_wrong_or_missing_secret_fails_fast_with_the_reason(servers, decode, reason):
    prefill_url = servers["prefill"].url
    refusals_before = metric_value(prefill_url, "pdserve_kv_handshake_auth_refusals_total")
    result = _run(servers, decode)
    assert result.decode.status == 500 and reason in result.decode.error, result.decode.error
    assert "KV handshake" in result.decode.error
    # Deadline-free: the refusal answers at once, long before any protocol deadline (30 s).
    assert result.decode.elapsed_s < 15.0
    assert not result.prefill.ok  # stopped by its page-list deadline: nobody it trusts asked
    wait_idle([prefill_url, servers[decode].url], timeout_s=PREFILL_DEADLINE_S + 10)
    assert metric_value(prefill_url, "pdserve_kv_handshake_auth_refusals_total") > refusals_before


def test_a_decode_with_the_wrong_secret_cannot_write_to_the_bootstrap_server(servers):
    """Its failure report (POST /register_dp_rank) is refused and counted by reason."""
    result = _run(servers, "decode_wrong")
    assert not result.decode.ok
    url = servers["prefill"].url
    assert (
        metric_value(url, "pdserve_bootstrap_auth_refusals_total", {"reason": "wrong proof"}) >= 1
    )
    wait_idle([url, servers["decode_wrong"].url], timeout_s=PREFILL_DEADLINE_S + 10)


@pytest.fixture(scope="module")
def prefill_dp2() -> Iterator:
    factory = PDFactory()
    try:
        yield factory.prefill(dp_size=2, args=["--disagg-secret", SECRET])
    finally:
        factory.stop_all()


def _handshake_answer(endpoint: str, wire: bytes) -> m.HandshakeResult:
    """Send `wire` to a prefill worker's KV endpoint as a bare ZeroMQ peer; its answer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(wire)
        assert sock.poll(10_000), f"no handshake answer from {endpoint}"
        answer = m.decode(sock.recv())
        assert isinstance(answer, m.HandshakeResult), answer
        return answer
    finally:
        sock.close()


def test_a_handshake_seen_on_the_wire_is_refused_by_the_other_prefill_workers(prefill_dp2):
    """Decode's signed handshake to worker 0, sent again by someone else to worker 1 (each
    worker remembers only its own nonces), was accepted there: the proof now names the
    worker. `backend` is one prefill refuses after the proof, so the answer tells whether
    the proof passed without opening a data connection."""
    url = f"http://127.0.0.1:{prefill_dp2.bootstrap_port}/route?prefill_dp_rank="
    workers = [http_json("GET", url + str(rank))[1] for rank in (0, 1)]
    layout = msgspec.convert(workers[0], KVLayout)
    handshake = m.Handshake(
        decode_id="decode-seen", layout=layout, backend="other",
        prefill_endpoint=workers[0]["kv_endpoint"],
    )  # fmt: skip
    wire = m.encode(kv_auth.sign(SECRET, handshake, time.time()))
    first = _handshake_answer(workers[0]["kv_endpoint"], wire)
    assert "transfer backend mismatch" in first.error, first.error  # the proof passed
    again = _handshake_answer(workers[1]["kv_endpoint"], wire)
    assert not again.ok and "KV handshake refused" in again.error, again.error
    assert f"made for prefill worker {workers[0]['kv_endpoint']!r}" in again.error
