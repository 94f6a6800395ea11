"""The `X-Request-Id` correlation header (vLLM's, SGLang's gateway's): which values are taken
as they come. Pure; used by the servers' front ends and by the router.

The header names a client request in answers and log lines only. It is never a request's
`rid`: clients may reuse a value, and rids must be unique while in flight."""

from __future__ import annotations

import os

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LEN = 128


def sane_request_id(value: str | None) -> str | None:
    """`value` if it may name a request in headers and log lines: 1 to 128 printable ASCII
    characters, no space (so a log line cannot be forged or split by it); else None, and
    the caller makes its own id rather than fail the request."""
    if not value or len(value) > MAX_REQUEST_ID_LEN:
        return None
    # ASCII and printable: no control character (DEL included); then no space.
    if not (value.isascii() and value.isprintable()) or " " in value:
        return None
    return value


def new_request_id() -> str:
    """32 random hex digits: unique across routers and servers without coordination.
    os.urandom, not uuid4: a router makes one per request that came without one, and a
    UUID object cost it 3 us against 0.6."""
    return os.urandom(16).hex()
