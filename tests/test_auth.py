"""The credential core: bearer keys, HMAC proofs over fresh nonces, the replay window."""

from __future__ import annotations

import pytest

from pdserve import auth

NOW = 1_800_000_000.0
MSG = auth.request_message("PUT", "/route", b'{"dp_rank":0}')


def test_bearer_accepts_only_the_exact_key():
    assert auth.bearer_ok("Bearer s3cret", "s3cret")
    assert auth.bearer_ok("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Basic s3cret", "Bearer s3cretX",
                   "Bearer s3cret\udce9", "Bearer s3cr\u00e9t"):  # fmt: skip
        assert not auth.bearer_ok(header, "s3cret"), header


def test_a_fresh_proof_is_accepted_once():
    checker = auth.ProofChecker("k")
    proof = auth.make_proof("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW)
    checker.check(proof, auth.BOOTSTRAP_PURPOSE, MSG, NOW + 1)
    with pytest.raises(auth.AuthError, match="replayed"):
        checker.check(proof, auth.BOOTSTRAP_PURPOSE, MSG, NOW + 2)
    assert checker.refused == {"replayed proof": 1}


@pytest.mark.parametrize(
    "secret, purpose, message, now, error",
    [
        ("other", auth.BOOTSTRAP_PURPOSE, MSG, NOW, "wrong proof"),
        ("k", auth.KV_HANDSHAKE_PURPOSE, MSG, NOW, "wrong proof"),
        ("k", auth.BOOTSTRAP_PURPOSE, MSG + b" ", NOW, "wrong proof"),
        ("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW + 31, "stale proof"),
        ("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW - 31, "stale proof"),
    ],
)
def test_wrong_or_stale_proofs_are_refused(secret, purpose, message, now, error):
    checker = auth.ProofChecker("k")
    proof = auth.make_proof(secret, auth.BOOTSTRAP_PURPOSE, MSG, NOW)
    with pytest.raises(auth.AuthError, match=error):
        checker.check(proof, purpose, message, now)
    assert checker.num_remembered == 0


@pytest.mark.parametrize("ts", [float("nan"), float("inf")])
def test_a_proof_whose_timestamp_is_not_finite_is_malformed(ts):
    """A NaN timestamp passed the window check (every comparison with NaN is False): such
    a proof, made once by a holder of the secret, was good forever, and again and again
    once its nonce was forgotten."""
    checker = auth.ProofChecker("k")
    proof = auth.make_proof("k", auth.BOOTSTRAP_PURPOSE, MSG, ts)
    for now in (NOW, NOW + 1e6):
        with pytest.raises(auth.AuthError, match="malformed proof"):
            checker.check(proof, auth.BOOTSTRAP_PURPOSE, MSG, now)
    assert checker.num_remembered == 0


def test_nonces_are_forgotten_only_when_no_clock_in_the_window_can_accept_them():
    checker = auth.ProofChecker("k", window_s=30.0)
    proof = auth.make_proof("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW)
    checker.check(proof, auth.BOOTSTRAP_PURPOSE, MSG, NOW - 29)
    assert checker.num_remembered == 1
    with pytest.raises(auth.AuthError, match="replayed"):
        checker.check(proof, auth.BOOTSTRAP_PURPOSE, MSG, NOW + 29)
    fresh = auth.make_proof("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW + 40)
    checker.check(fresh, auth.BOOTSTRAP_PURPOSE, MSG, NOW + 40)
    assert checker.num_remembered == 1  # the first nonce can no longer be replayed: dropped


def test_the_proof_header_round_trips_and_garbage_is_refused():
    proof = auth.make_proof("k", auth.BOOTSTRAP_PURPOSE, MSG, NOW)
    assert auth.parse_proof_header(proof.header()) == proof
    for garbage in (None, "", "v2 ts=1 nonce=a mac=b", "v1 ts=x nonce=a mac=b", "v1 ts=1"):
        with pytest.raises(auth.AuthError):
            auth.parse_proof_header(garbage)
    bad_nonce = auth.Proof(NOW, "zz" * 16, proof.mac)
    with pytest.raises(auth.AuthError, match="malformed"):
        auth.ProofChecker("k").check(bad_nonce, auth.BOOTSTRAP_PURPOSE, MSG, NOW)


def test_loopback_hosts():
    assert all(auth.is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "10.213.0.1", "::", "example.org"))
