"""The logger aiohttp's request handlers report to, in every aiohttp server of pdserve (the
servers' front ends, the bootstrap server): a request its parser refused is one line.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

_LOGGER_NAME = "pdserve.http"


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request its parser refused (a header line past 8190 bytes, a control
    byte in a header) at ERROR with a traceback whose message quotes the raw line: an
    `Authorization: Bearer <key>` line put the API key in the log, and any client could fill
    the log with tracebacks. Such a record becomes one INFO line naming the peer and the
    error's kind, never the bytes; the client still gets aiohttp's 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg = "refused a malformed HTTP request from %s: %s (HTTP %d)"
            record.args = (peer, type(exc).__name__, exc.code)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def request_logger() -> logging.Logger:
    """For `web.AppRunner(..., logger=request_logger())`."""
    logger = logging.getLogger(_LOGGER_NAME)
    if not any(isinstance(f, _MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(_MalformedRequestFilter())
    return logger
