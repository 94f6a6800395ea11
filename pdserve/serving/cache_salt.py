"""The prefix-cache salt a request body asks for: vLLM's `cache_salt`, SGLang's `extra_key`.
Pure. The server's front end parses it (a 400 for a bad one); the router hashes prompts
with it for kv_aware, so both read a body through this one function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Between the two fields when a body gives both (SGLang concatenates them), so that
# ("ab", "c") and ("a", "bc") are two salts.
SEPARATOR = "\x00"


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
