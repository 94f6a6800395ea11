"""A request body's bytes as the servers read them (router process; pure).

The servers undo a gzip or deflate Content-Encoding (`serving/content_coding.py`, shared)
and `json.loads` skips a UTF-8 byte order mark; the router parsed the raw bytes, so such a
body, served colocated, was a 400 'JSON is malformed' through the router.
"""

from __future__ import annotations

import codecs

from pdserve.router.body import BadRequest
from pdserve.serving import content_coding
from pdserve.serving.content_coding import UnsupportedCoding
from pdserve.serving.hooks import MAX_BODY_BYTES, RequestError

__all__ = ["ACCEPT_ENCODING", "MAX_DECODED_BYTES", "UnsupportedCoding", "decoded_body"]
# The servers' body limit: a body that decodes past it is refused as they refuse it.
MAX_DECODED_BYTES = MAX_BODY_BYTES
# The header of a 415, as the servers send it.
ACCEPT_ENCODING = {"Accept-Encoding": content_coding.ACCEPTED_CODINGS}


def decoded_body(raw: bytes, content_encoding: str | None) -> bytes:
    """`raw` with its content coding undone and a leading byte order mark dropped:
    UnsupportedCoding (415, br or zstd), else a BadRequest (400, or 413 past
    MAX_DECODED_BYTES) when it cannot be read."""
    try:
        raw = content_coding.decoded_body(raw, content_encoding, MAX_DECODED_BYTES)
    except UnsupportedCoding:
        raise
    except RequestError as exc:
        raise BadRequest(exc.message, status=exc.status) from None
    return raw.removeprefix(codecs.BOM_UTF8)
