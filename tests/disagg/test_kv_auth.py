"""The disagg secret on the KV handshake, both directions (pure, no sockets)."""

from __future__ import annotations

import msgspec

from pdserve.auth import ProofChecker
from pdserve.disagg import kv_auth
from pdserve.disagg import messages as m
from pdserve.engine.kv_layout import KVLayout

NOW = 1_800_000_000.0
LAYOUT = KVLayout(
    page_size=16,
    kv_dtype="float32",
    num_layers=2,
    num_kv_heads=2,
    head_dim=8,
    model_fingerprint="x",
)


ENDPOINT = "tcp://10.0.0.1:5000"


def _handshake() -> m.Handshake:
    return m.Handshake(
        decode_id="decode-0", layout=LAYOUT, backend="zmq", prefill_endpoint=ENDPOINT
    )


def _round_trip(decode_secret, prefill_secret, now=NOW):
    sent = kv_auth.sign(decode_secret, _handshake(), NOW)
    wire = m.decode(m.encode(sent))
    checker = ProofChecker(prefill_secret) if prefill_secret else None
    error = kv_auth.check(checker, wire, now, ENDPOINT)
    result = kv_auth.answer(checker, wire, m.HandshakeResult(ok=error is None, error=error))
    answer = m.decode(m.encode(result))
    return error, kv_auth.check_answer(decode_secret, sent, answer), checker


def test_same_secret_on_both_sides_passes_both_ways():
    assert _round_trip("s", "s")[:2] == (None, None)


def test_no_secret_anywhere_checks_nothing():
    assert _round_trip(None, None)[:2] == (None, None)


def test_mismatched_secrets_are_refused_by_prefill_and_counted():
    error, _, checker = _round_trip("a", "b")
    assert "disagg secrets differ" in error
    assert checker.refused == {"wrong proof": 1}


def test_decode_without_secret_is_told_what_is_missing():
    error, _, checker = _round_trip(None, "s")
    assert "missing proof" in error and "--disagg-secret" in error
    assert sum(checker.refused.values()) == 1


def test_decode_refuses_a_prefill_that_cannot_prove_the_secret():
    assert "did not prove" in _round_trip("s", None)[1]
    sent = kv_auth.sign("s", _handshake(), NOW)
    forged = m.HandshakeResult(ok=True, proof="00" * 32)
    assert "secrets differ" in kv_auth.check_answer("s", sent, forged)


def test_a_replayed_handshake_is_refused():
    checker = ProofChecker("s")
    wire = m.encode(kv_auth.sign("s", _handshake(), NOW))
    assert kv_auth.check(checker, m.decode(wire), NOW, ENDPOINT) is None
    assert "replayed" in kv_auth.check(checker, m.decode(wire), NOW + 1, ENDPOINT)


def test_a_handshake_is_good_only_at_the_prefill_worker_it_names():
    """Each prefill worker's checker knows only its own nonces: a handshake seen on the wire
    was accepted once more by every other worker of the secret (another DP rank, another
    prefill server) within the 30 s window."""
    wire = m.encode(kv_auth.sign("s", _handshake(), NOW))
    assert kv_auth.check(ProofChecker("s"), m.decode(wire), NOW, ENDPOINT) is None
    other = ProofChecker("s")
    error = kv_auth.check(other, m.decode(wire), NOW, "tcp://10.0.0.1:5001")
    assert "made for prefill worker 'tcp://10.0.0.1:5000'" in error, error
    assert other.refused == {"wrong endpoint": 1}
    moved = msgspec.structs.replace(m.decode(wire), prefill_endpoint="tcp://10.0.0.1:5001")
    assert "secrets differ" in kv_auth.check(other, moved, NOW, "tcp://10.0.0.1:5001")


def test_an_older_decode_is_told_its_version_not_that_the_secrets_differ():
    """Version 8 put prefill_endpoint under the proof: an older decode's proof covers other
    bytes, which read as 'the disagg secrets differ'."""
    older = msgspec.structs.replace(_handshake(), version=m.PROTOCOL_VERSION - 1)
    error = kv_auth.check(ProofChecker("s"), kv_auth.sign("s", older, NOW), NOW, ENDPOINT)
    assert error == f"protocol version mismatch: decode=7 prefill={m.PROTOCOL_VERSION}"


def test_a_handshake_altered_in_flight_is_refused():
    sent = kv_auth.sign("s", _handshake(), NOW)
    altered = msgspec.structs.replace(sent, decode_id="evil")
    assert "secrets differ" in kv_auth.check(ProofChecker("s"), altered, NOW, ENDPOINT)


def test_a_routable_bind_without_the_secret_is_warned_about():
    from pdserve.disagg.config import DisaggConfig, PDServerConfig
    from pdserve.disagg.frontend import _secret_warnings
    from pdserve.engine.config import EngineConfig
    from pdserve.serving.config import ServerArgs

    def warnings(host: str, secret: str | None) -> list[str]:
        server = ServerArgs(mode="prefill", host=host)
        cfg = PDServerConfig(server, EngineConfig(), DisaggConfig(disagg_secret=secret))
        return _secret_warnings(cfg)

    assert "without --disagg-secret" in warnings("0.0.0.0", None)[0]
    assert warnings("0.0.0.0", "s") == [] and warnings("127.0.0.1", None) == []


def test_the_proof_covers_the_transfer_metadata_both_ways():
    """NIXL agent metadata rides in the handshake: swapping it breaks the proof."""
    sent = kv_auth.sign("s", _handshake(), NOW)
    tampered = msgspec.structs.replace(sent, transfer_meta=b"another agent")
    assert "secrets differ" in kv_auth.check(ProofChecker("s"), tampered, NOW, ENDPOINT)
    checker = ProofChecker("s")
    assert kv_auth.check(checker, sent, NOW, ENDPOINT) is None
    result = m.HandshakeResult(ok=True, transfer_meta=b"prefill agent")
    answer = kv_auth.answer(checker, sent, result)
    forged = msgspec.structs.replace(answer, transfer_meta=b"someone else")
    assert kv_auth.check_answer("s", sent, answer) is None
    assert "secrets differ" in kv_auth.check_answer("s", sent, forged)
