"""The `X-Request-Id` of a request to a server's front end (front-end process): chosen once
per request, echoed in the head of every answer of the generation routes, and named in the
log lines about that request."""

from __future__ import annotations

from aiohttp import web

from pdserve.serving.request_id import REQUEST_ID_HEADER, new_request_id, sane_request_id

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
_REQUEST_ID = "pdserve.request_id"  # request key: the id, once chosen


def request_id(request: web.Request, first_rid: str | None = None) -> str:
    """The request's id, chosen at the first call: the client's header if sane (a router
    sends its own), else `first_rid` (the request's first rid, once parsed) if sane, else a
    new one (a request refused before its rids were known). Never a rid itself: rids stay
    unique in flight whatever clients send in the header."""
    chosen = request.get(_REQUEST_ID)
    if chosen is None:
        chosen = (
            sane_request_id(request.headers.get(REQUEST_ID_HEADER))
            or sane_request_id(first_rid)
            or new_request_id()
        )
        request[_REQUEST_ID] = chosen
    return chosen


def log_tag(request: web.Request) -> str:
    """` [request_id=<id>]` for a log line about a generation request, else ""."""
    if request.path not in GENERATION_PATHS:
        return ""
    return f" [request_id={request_id(request)}]"


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """For `app.on_response_prepare`: every answer of a generation route (a whole answer, an
    error, or a stream as its head goes out) carries the request's id."""
    if request.path in GENERATION_PATHS:
        response.headers[REQUEST_ID_HEADER] = request_id(request)
