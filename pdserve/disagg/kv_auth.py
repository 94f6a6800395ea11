"""The disagg secret on the KV handshake (pure: the clock is passed in). Runs in workers.

Decode signs its Handshake with a fresh nonce and its wall clock; prefill checks it (stale,
replayed and wrong proofs refused) and signs its answer over decode's nonce, so each side
knows the other holds the secret, and the secret never travels.
"""

from __future__ import annotations

import hmac

import msgspec

from pdserve import auth
from pdserve.disagg import messages as m


def _covered(msg: m.Handshake | m.HandshakeResult) -> bytes:
    return m.encode(msgspec.structs.replace(msg, proof=None))


def sign(secret: str | None, handshake: m.Handshake, now: float) -> m.Handshake:
    """The handshake as decode sends it: with a proof when it has a secret."""
    if not secret:
        return handshake
    proof = auth.make_proof(secret, auth.KV_HANDSHAKE_PURPOSE, _covered(handshake), now)
    return msgspec.structs.replace(
        handshake, proof=m.HandshakeProof(ts=proof.ts, nonce=proof.nonce, mac=proof.mac)
    )


def check(
    checker: auth.ProofChecker | None, handshake: m.Handshake, now: float, endpoint: str | None
) -> str | None:
    """Prefill worker at KV `endpoint`: why the handshake must be refused, or None."""
    if checker is None:
        return None
    version = handshake.version_mismatch()  # its proof covers other bytes: not "secrets"
    if version is not None:
        return version
    if handshake.proof is None:
        checker.refuse("missing proof")
        return (
            "missing proof of the disagg secret: this prefill server requires "
            "--disagg-secret (or PDSERVE_DISAGG_SECRET) on decode"
        )
    p = handshake.proof
    try:
        checker.check(
            auth.Proof(p.ts, p.nonce, p.mac), auth.KV_HANDSHAKE_PURPOSE, _covered(handshake), now
        )
    except auth.AuthError as exc:
        return f"KV handshake refused: {exc}"
    # The proof names its prefill worker: one seen on the wire was accepted by every other
    # worker of the secret once (each checker knows only its own nonces).
    if handshake.prefill_endpoint != endpoint:
        checker.refuse("wrong endpoint")
        return (
            f"KV handshake refused: it was made for prefill worker "
            f"{handshake.prefill_endpoint!r}, not this one ({endpoint})"
        )
    return None


def answer(
    checker: auth.ProofChecker | None, handshake: m.Handshake, result: m.HandshakeResult
) -> m.HandshakeResult:
    """Prefill's answer, signed over decode's nonce when both hold a secret."""
    if checker is None or handshake.proof is None:
        return result
    mac = checker.answer(auth.KV_HANDSHAKE_PURPOSE, handshake.proof.nonce, _covered(result))
    return msgspec.structs.replace(result, proof=mac)


def check_answer(
    secret: str | None, sent: m.Handshake | None, result: m.HandshakeResult
) -> str | None:
    """Decode: why prefill's answer must not be trusted, or None."""
    if not secret or not result.ok:
        return None
    if sent is None or sent.proof is None or result.proof is None:
        return (
            "the prefill worker did not prove the disagg secret (is --disagg-secret set "
            "on the prefill server?)"
        )
    expected = auth.answer_mac(
        secret, auth.KV_HANDSHAKE_PURPOSE, sent.proof.nonce, _covered(result)
    )
    if not hmac.compare_digest(expected, result.proof):
        return "wrong proof from the prefill worker: the disagg secrets differ"
    return None
