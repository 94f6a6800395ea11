"""The prefix-cache salt a request body asks for: vLLM's `cache_salt`, SGLang's `extra_key`.
Pure. The server's front end parses it (a 400 for a bad one) and hands its workers the salt's
key; the router hashes prompts under that key for kv_aware: both read a body through
`body_salt_key`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

KEY_BYTES = 16


class CacheSaltError(ValueError):
    """A salt field of the wrong type or empty; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def body_cache_salt(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The salt of every prompt of the request, as its parts, or None (null or absent
    fields). vLLM's rule for `cache_salt`: a non-empty string if given. SGLang's for
    `extra_key`: a string, the empty one asking for none. One given: that salt, by either
    name; both: the pair (`cache_salt`, `extra_key`), another salt than either alone."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise CacheSaltError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
        )
    extra_key = body.get("extra_key")
    if extra_key is not None and not isinstance(extra_key, str):
        got = type(extra_key).__name__
        raise CacheSaltError(f"extra_key must be a string, got {got}", "extra_key")
    parts = tuple(part for part in (salt, extra_key) if part)
    return parts or None


def salt_key(*parts: str) -> str:
    """What a salt is hashed with on every role: the hex blake2b digest (KEY_BYTES) of its
    parts' UTF-8 bytes, the first's length before them when there are two, and their number
    first, so that no two salts share a key (joined by a NUL, ("a", "b") was the salt
    "a\x00b"). Of fixed size, so that a client's salt of any length (up to the body's
    64 MiB) is read once, where the request enters: sent to the workers with every sequence
    of a batch or of n samples, and kept by each, one salt of some MiB made GiB."""
    encoded = [part.encode("utf-8", "surrogatepass") for part in parts]  # any str a parser made
    digest = hashlib.blake2b(str(len(parts)).encode(), digest_size=KEY_BYTES)
    if len(encoded) == 2:
        digest.update(len(encoded[0]).to_bytes(8, "little"))
    for data in encoded:
        digest.update(data)
    return digest.hexdigest()


def body_salt_key(body: Mapping[str, Any]) -> str | None:
    """The key (`salt_key`) of the body's salt (`body_cache_salt`), or None."""
    parts = body_cache_salt(body)
    return None if parts is None else salt_key(*parts)
