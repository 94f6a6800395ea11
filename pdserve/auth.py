"""Credentials, as pure functions and one small stateful checker (no I/O, the clock passed in).

API keys: `Authorization: Bearer <key>` on every HTTP route but `/health`. The disagg secret:
a proof is an HMAC-SHA256 over a purpose, a fresh client nonce, a wall-clock timestamp and
the message it covers; the checker refuses stale, replayed and wrong proofs. Used by every
process that serves or calls pdserve routes (server front ends, workers, router, bench).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
from collections import deque
from dataclasses import dataclass

# A proof is accepted while |now - ts| <= window: the clocks of the machines must agree to
# within it (NTP). Its nonce is remembered until no clock in the window can accept it again.
PROOF_WINDOW_S = 30.0
MAX_REMEMBERED_NONCES = 1_000_000
PROOF_HEADER = "X-PDServe-Proof"
BOOTSTRAP_PURPOSE = "bootstrap"
KV_HANDSHAKE_PURPOSE = "kv-handshake"
_NONCE_HEX_LEN = 32


class AuthError(Exception):
    """A missing, malformed, stale, replayed or wrong credential; the message says which."""


def bearer_ok(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header value carries `api_key` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.isascii():
        return False  # keys are ASCII; aiohttp hands other bytes over as lone surrogates
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


API_KEY_FORM = (
    "--api-key (or env PDSERVE_API_KEY) must be non-empty visible ASCII without spaces (it "
    "travels in a header)"
)


def api_key_ok(api_key: str | None) -> bool:
    """None (no key), or a key that fits in a header: visible ASCII, no spaces."""
    return api_key is None or (
        bool(api_key) and api_key.isascii() and api_key.isprintable() and " " not in api_key
    )


def bearer_header(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass(frozen=True)
class Proof:
    ts: float  # the prover's wall clock, seconds since the epoch
    nonce: str  # 32 hex digits, fresh per proof
    mac: str  # hex HMAC-SHA256

    def header(self) -> str:
        return f"v1 ts={self.ts:.6f} nonce={self.nonce} mac={self.mac}"


def _mac(secret: str, purpose: str, ts: float, nonce: str, message: bytes) -> str:
    digest = hashlib.sha256(message).hexdigest()
    text = f"pdserve-v1\n{purpose}\n{ts:.6f}\n{nonce}\n{digest}".encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def make_proof(secret: str, purpose: str, message: bytes, now: float) -> Proof:
    """A proof that the holder of `secret` sent `message` for `purpose` at `now`."""
    nonce = secrets.token_hex(_NONCE_HEX_LEN // 2)
    ts = round(now, 6)
    return Proof(ts, nonce, _mac(secret, purpose, ts, nonce, message))


def answer_mac(secret: str, purpose: str, nonce: str, message: bytes) -> str:
    """The answering side's proof over the asker's nonce (fresh by construction)."""
    return _mac(secret, purpose + "/answer", 0.0, nonce, message)


def request_message(method: str, path: str, body: bytes) -> bytes:
    """What an HTTP write's proof covers: the method, the route and the exact body."""
    return f"{method} {path}\n".encode() + body


def parse_proof_header(value: str | None) -> Proof:
    if not value:
        raise AuthError(f"missing {PROOF_HEADER} header: this server requires the disagg secret")
    version, _, rest = value.strip().partition(" ")
    fields = dict(part.partition("=")[::2] for part in rest.split())
    if version != "v1" or set(fields) != {"ts", "nonce", "mac"}:
        raise AuthError(f"malformed {PROOF_HEADER} header: want 'v1 ts=.. nonce=.. mac=..'")
    try:
        ts = float(fields["ts"])
    except ValueError:
        raise AuthError(f"malformed {PROOF_HEADER} header: ts is not a number") from None
    return Proof(ts, fields["nonce"], fields["mac"])


class ProofChecker:
    """Checks proofs for one secret; remembers nonces of accepted proofs to refuse replays.

    Memory is bounded: past MAX_REMEMBERED_NONCES live nonces, new proofs are refused (and
    counted) rather than forgetting a nonce that could still be replayed."""

    def __init__(self, secret: str, window_s: float = PROOF_WINDOW_S):
        if not secret:
            raise ValueError("the disagg secret must not be empty")
        self._secret = secret
        self.window_s = window_s
        self._seen: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()  # (forget_at, nonce), monotone
        self.refused: dict[str, int] = {}

    def check(self, proof: Proof, purpose: str, message: bytes, now: float) -> None:
        """Raises AuthError (and counts it by reason) unless the proof is good and new."""
        try:
            self._check(proof, purpose, message, now)
        except AuthError as exc:
            reason = str(exc).split(":", 1)[0]
            self.refused[reason] = self.refused.get(reason, 0) + 1
            raise

    def refuse(self, reason: str) -> None:
        """Counts a refusal decided outside the checker (e.g. a missing header)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _check(self, proof: Proof, purpose: str, message: bytes, now: float) -> None:
        self._forget(now)
        if len(proof.nonce) != _NONCE_HEX_LEN or not _is_hex(proof.nonce):
            raise AuthError("malformed proof: the nonce must be 32 hex digits")
        if not math.isfinite(proof.ts):  # |now - nan| > window is False: no window at all
            raise AuthError("malformed proof: the timestamp must be a finite number")
        if abs(now - proof.ts) > self.window_s:
            raise AuthError(
                f"stale proof: its timestamp is {now - proof.ts:+.1f}s from this clock "
                f"(window {self.window_s:g}s; are the clocks in sync?)"
            )
        expected = _mac(self._secret, purpose, proof.ts, proof.nonce, message)
        if not hmac.compare_digest(expected, proof.mac):
            raise AuthError("wrong proof: the disagg secrets differ (or the message was altered)")
        if proof.nonce in self._seen:
            raise AuthError("replayed proof: this nonce was already used")
        if len(self._seen) >= MAX_REMEMBERED_NONCES:
            raise AuthError("too many proofs in the window: try again shortly")
        self._seen.add(proof.nonce)
        self._expiry.append((now + 2 * self.window_s, proof.nonce))

    def answer(self, purpose: str, nonce: str, message: bytes) -> str:
        return answer_mac(self._secret, purpose, nonce, message)

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            self._seen.discard(self._expiry.popleft()[1])

    @property
    def num_remembered(self) -> int:
        return len(self._seen)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def is_loopback(host: str) -> bool:
    """True for hosts that only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: assume it resolves to a routable address
