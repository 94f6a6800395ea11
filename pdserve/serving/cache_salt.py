"""The prefix-cache salt a request body asks for: vLLM's `cache_salt`, SGLang's `extra_key`.
Pure. The server's front end parses it (a 400 for a bad one) and hands its workers the salt's
key; the router hashes prompts under that key for kv_aware: both read a body through
`body_salt_key`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

# Between the two fields when a body gives both (SGLang concatenates them), so that
# ("ab", "c") and ("a", "bc") are two salts.
SEPARATOR = "\x00"
KEY_BYTES = 16


class CacheSaltError(ValueError):
    """A salt field of the wrong type or empty; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def body_cache_salt(body: Mapping[str, Any]) -> str | None:
    """The salt of every prompt of the request, or None (null or absent fields). vLLM's
    rule for `cache_salt`: a non-empty string if given. SGLang's for `extra_key`: a string,
    the empty one asking for none. Both given: `cache_salt`, SEPARATOR, `extra_key`."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise CacheSaltError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
        )
    extra_key = body.get("extra_key")
    if extra_key is not None and not isinstance(extra_key, str):
        got = type(extra_key).__name__
        raise CacheSaltError(f"extra_key must be a string, got {got}", "extra_key")
    if salt and extra_key:
        return salt + SEPARATOR + extra_key
    return salt or extra_key or None


def salt_key(salt: str) -> str:
    """What a salt is hashed with on every role: the hex blake2b digest (KEY_BYTES) of its
    UTF-8 bytes. Of fixed size, so that a client's salt of any length (up to the body's
    64 MiB) is read once, where the request enters: sent to the workers with every sequence
    of a batch or of n samples, and kept by each, one salt of some MiB made GiB."""
    salt_bytes = salt.encode("utf-8", "surrogatepass")  # total: any str a parser made
    return hashlib.blake2b(salt_bytes, digest_size=KEY_BYTES).hexdigest()


def body_salt_key(body: Mapping[str, Any]) -> str | None:
    """The key (`salt_key`) of the body's salt (`body_cache_salt`), or None."""
    salt = body_cache_salt(body)
    return None if salt is None else salt_key(salt)
