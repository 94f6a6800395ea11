"""A request body's bytes as the servers read them (router process; pure).

The servers (aiohttp, then `json.loads`) undo a gzip or deflate Content-Encoding and skip a
UTF-8 byte order mark; the router parsed the raw bytes, so such a body, served colocated,
was a 400 'JSON is malformed' through the router.
"""

from __future__ import annotations

import codecs
import zlib

from pdserve.router.body import BadRequest
from pdserve.serving.hooks import MAX_BODY_BYTES

# The servers' body limit: a body that decodes past it is refused as they refuse it.
MAX_DECODED_BYTES = MAX_BODY_BYTES


def decoded_body(raw: bytes, content_encoding: str | None) -> bytes:
    """`raw` with its content coding undone and a leading byte order mark dropped; a
    BadRequest (400, or 413 past MAX_DECODED_BYTES) when it cannot be read. Codings the
    servers do not decode either pass as they are (aiohttp ignores them too)."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("br", "zstd"):  # aiohttp's 400 without their optional packages
        raise BadRequest(f"Content-Encoding {coding} is not supported: send gzip or deflate")
    if coding in ("gzip", "deflate") and raw:
        raw = _inflate(raw, coding)
    return raw.removeprefix(codecs.BOM_UTF8)


def _inflate(raw: bytes, coding: str) -> bytes:
    # deflate is zlib-wrapped by the RFC; aiohttp also takes raw deflate, told by its header.
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    if coding == "deflate" and raw[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, MAX_DECODED_BYTES + 1)
    except zlib.error as exc:
        raise BadRequest(f"unreadable body: {coding}: {exc}") from None
    if len(out) > MAX_DECODED_BYTES:
        raise BadRequest(f"body of over {MAX_DECODED_BYTES} bytes once decoded", status=413)
    if not inflater.eof:
        raise BadRequest(f"unreadable body: {coding} data ends before its end mark")
    return out
