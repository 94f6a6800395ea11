"""Cross-origin (CORS) answers for browser clients, as pure functions. Used by the server
front ends and the router.

A web page served from another origin calls the API only if the answer allows that origin,
and sends a preflight `OPTIONS` first for a JSON POST or an `Authorization` header. vLLM and
SGLang allow every origin by default (`--allowed-origins`); without this a browser client
that works against them fails against pdserve (the preflight was a 405).
"""

from __future__ import annotations

from collections.abc import Sequence

ANY_ORIGIN = "*"
DEFAULT_ALLOWED_ORIGINS = [ANY_ORIGIN]
ALLOWED_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
# Browsers show a page only the CORS-safelisted headers of an answer unless told more.
EXPOSED_HEADERS = "X-Request-Id"
PREFLIGHT_MAX_AGE_S = 600


def allowed_origin(origin: str | None, allowed: Sequence[str]) -> str | None:
    """The `Access-Control-Allow-Origin` value for a request from `origin`, or None (no
    CORS headers: not a cross-origin request, or an origin not allowed)."""
    if not origin or not allowed:
        return None
    if ANY_ORIGIN in allowed:
        return ANY_ORIGIN
    return origin if origin in allowed else None


def is_preflight(method: str, origin: str | None, request_method: str | None) -> bool:
    """A browser's preflight: OPTIONS naming its origin and the method it means to send."""
    return method == "OPTIONS" and bool(origin) and bool(request_method)


def answer_headers(origin: str | None, allowed: Sequence[str]) -> dict[str, str]:
    """The headers an answer to a cross-origin request adds (none if it is not allowed)."""
    value = allowed_origin(origin, allowed)
    if value is None:
        return {}
    headers = {
        "Access-Control-Allow-Origin": value,
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
    }
    if value != ANY_ORIGIN:
        headers["Vary"] = "Origin"  # the answer depends on the asking origin
    return headers


def preflight_headers(
    origin: str | None, request_headers: str | None, allowed: Sequence[str]
) -> dict[str, str] | None:
    """The headers of the 200 answering a preflight, or None when its origin is not
    allowed (the preflight then gets the route's ordinary answer, which allows nothing)."""
    headers = answer_headers(origin, allowed)
    if not headers:
        return None
    headers |= {
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    if request_headers:  # every header the page asks to send (Authorization, Content-Type)
        headers["Access-Control-Allow-Headers"] = request_headers
    return headers
