"""CORS for the server's HTTP routes (front end): preflights answered before any other
middleware (a browser sends no API key with one), and every answer to an allowed origin
marked so (pure rules in pdserve/cors.py)."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from pdserve.cors import answer_headers, is_preflight, preflight_headers


def cors_middleware(allowed: Sequence[str]):
    """Answers a preflight from an allowed origin with a 200; anything else passes on."""

    @web.middleware
    async def preflight(request: web.Request, handler) -> web.StreamResponse:
        headers = request.headers
        origin = headers.get("Origin")
        if is_preflight(request.method, origin, headers.get("Access-Control-Request-Method")):
            allowed_headers = preflight_headers(
                origin, headers.get("Access-Control-Request-Headers"), allowed
            )
            if allowed_headers is not None:
                return web.Response(status=200, headers=allowed_headers)
        return await handler(request)

    return preflight


def cors_on_prepare(allowed: Sequence[str]):
    """For `app.on_response_prepare`: every answer (an error, a stream's head) to an allowed
    origin says so, else the browser hides it from the page."""

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in answer_headers(request.headers.get("Origin"), allowed).items():
            response.headers.setdefault(name, value)

    return mark
