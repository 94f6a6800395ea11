"""A request body's Content-Encoding, undone as every pdserve HTTP site reads it: the
servers' front ends and bootstrap servers (their aiohttp sites leave bodies coded) and the
router (pure). gzip and deflate are read; br and zstd, which aiohttp decodes only with
optional packages (else its plain-text 400), are a JSON 415 naming what is accepted; a
coding no one knows passes as it is, as aiohttp let it.
"""

from __future__ import annotations

import zlib

from pdserve.serving.hooks import RequestError

ACCEPTED_CODINGS = "gzip, deflate, identity"  # an Accept-Encoding value (RFC 9110 12.5.3)
UNSUPPORTED_CODINGS = frozenset({"br", "zstd"})


class UnsupportedCoding(RequestError):
    """415 Unsupported Media Type: send the body with one of ACCEPTED_CODINGS. The answer
    carries `Accept-Encoding: ACCEPTED_CODINGS` (RFC 7694)."""

    def __init__(self, coding: str):
        message = (
            f"Content-Encoding {coding} is not supported: send the body with gzip, deflate "
            "or identity"
        )
        super().__init__(415, message)


def decoded_body(raw: bytes, content_encoding: str | None, max_nbytes: int) -> bytes:
    """`raw` with its content coding undone: UnsupportedCoding (415), or a RequestError of
    400 (bytes that do not follow their coding) or 413 (over `max_nbytes` once decoded)."""
    coding = (content_encoding or "").strip().lower()
    if coding in UNSUPPORTED_CODINGS:
        raise UnsupportedCoding(coding)
    if coding in ("gzip", "deflate") and raw:
        return _inflate(raw, coding, max_nbytes)
    return raw


def _inflate(raw: bytes, coding: str, max_nbytes: int) -> bytes:
    # deflate is zlib-wrapped by the RFC; aiohttp also took raw deflate, told by its header.
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    if coding == "deflate" and raw[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, max_nbytes + 1)
    except zlib.error as exc:
        raise RequestError(400, f"unreadable body: {coding}: {exc}") from None
    if len(out) > max_nbytes:
        raise RequestError(413, f"body of over {max_nbytes} bytes once decoded")
    if not inflater.eof:
        raise RequestError(400, f"unreadable body: {coding} data ends before its end mark")
    return out
