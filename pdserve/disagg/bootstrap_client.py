"""Clients of the bootstrap server (docs/protocol.md section 3).

`register_worker_blocking` runs in a prefill worker process at start-up (plain blocking code);
the async helpers run in a decode front end (aiohttp ClientSession).
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import msgspec

from pdserve import auth, netaddr
from pdserve.disagg.bootstrap_registry import (
    EPOCH_HEADER,
    RoomFailure,
    ServerInfo,
    WorkerRegistration,
    check_room,
)

RETRY_INTERVAL_S = 0.05
MAX_RETRY_INTERVAL_S = 0.25  # registration is what readiness waits for
FAILURE_ATTEMPT_TIMEOUT_S = 2.0  # one POST of a room's failure
MAX_FAILURE_RETRY_INTERVAL_S = 1.0
_RankAnswer = dict[str, int | RoomFailure]


class BootstrapClientError(Exception):
    """A bootstrap call that failed. `status` is the HTTP status, or None when no valid HTTP
    answer came (connection refused, timeout, garbage body)."""

    def __init__(self, message: str, status: int | None = None, refused: bool = False):
        super().__init__(message)
        self.status = status
        self.refused = refused  # nothing listens at the address: the server is down

    @property
    def retryable(self) -> bool:
        """Worth asking again before the caller's deadline (not ready, restarting, unreachable)."""
        return self.status is None or self.status >= 500


def bootstrap_url(host: str, port: int) -> str:
    """The base URL of a bootstrap server, e.g. from a request's bootstrap_host/port (an
    IPv6 literal with or without brackets)."""
    return netaddr.http_url(host, port)


def _error_message(body: bytes) -> str:
    try:
        return str(msgspec.json.decode(body)["error"]["message"])
    except Exception:  # not our error shape: show the start of what came back
        return body[:200].decode("utf-8", "replace")


def write_headers(secret: str | None, method: str, path: str, body: bytes) -> dict[str, str]:
    """Headers of a bootstrap write: JSON, plus a fresh proof of the secret when one is set
    (a new nonce per attempt: the server refuses a proof it has seen)."""
    headers = {"Content-Type": "application/json"}
    if secret:
        message = auth.request_message(method, path, body)
        proof = auth.make_proof(secret, auth.BOOTSTRAP_PURPOSE, message, time.time())
        headers[auth.PROOF_HEADER] = proof.header()
    return headers


def _put_once(url: str, body: bytes, timeout_s: float, secret: str | None) -> None:
    headers = write_headers(secret, "PUT", "/route", body)
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise BootstrapClientError(
            f"PUT {url}: {exc.code} {_error_message(exc.read())}", exc.code
        ) from None
    except (OSError, TimeoutError) as exc:  # URLError is an OSError
        raise BootstrapClientError(f"PUT {url}: {exc}") from None


def register_worker_blocking(
    bootstrap_url: str,
    registration: WorkerRegistration,
    timeout_s: float,
    secret: str | None = None,
) -> None:
    """PUT /route until accepted. Retries while the server is unreachable or answers 5xx (it
    may start after the worker), with backoff, until `timeout_s`; a 4xx fails at once."""
    url = bootstrap_url.rstrip("/") + "/route"
    body = msgspec.json.encode(registration)
    deadline = time.monotonic() + timeout_s
    interval_s = RETRY_INTERVAL_S
    while True:
        try:
            return _put_once(url, body, max(deadline - time.monotonic(), 0.01), secret)
        except BootstrapClientError as exc:
            remaining_s = deadline - time.monotonic()
            if not exc.retryable or remaining_s <= 0:
                # A refusal came at once: "within the deadline" would send one looking for
                # a slow server instead of the answer (another server on that port, say).
                why = "was refused by" if not exc.retryable else f"within {timeout_s}s could not"
                raise BootstrapClientError(
                    f"worker dp_rank={registration.dp_rank} {why} register with the "
                    f"bootstrap server: {exc}",
                    exc.status,
                ) from None
        time.sleep(min(interval_s, remaining_s))  # backoff in a blocking start-up path
        interval_s = min(interval_s * 2, MAX_RETRY_INTERVAL_S)


async def _call_with_epoch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    kind: type[Any],
    timeout_s: float,
    **kwargs: Any,
) -> tuple[Any, int | None]:
    """One request: the 200 body decoded as `kind` and the answering server's epoch header
    (None without one), else BootstrapClientError."""
    try:
        async with session.request(
            method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs
        ) as resp:
            body = await resp.read()
            status = resp.status
            epoch_text = resp.headers.get(EPOCH_HEADER)
    except aiohttp.ClientConnectorError as exc:
        raise BootstrapClientError(
            f"{method} {url}: cannot connect ({exc.os_error.strerror or exc})", refused=True
        ) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise BootstrapClientError(f"{method} {url}: {exc!r}") from None
    if status != 200:
        raise BootstrapClientError(f"{method} {url}: {status} {_error_message(body)}", status)
    try:
        decoded = msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BootstrapClientError(f"{method} {url}: malformed answer: {exc}") from None
    if epoch_text is None:
        return decoded, None
    if not (epoch_text.isascii() and epoch_text.isdigit() and len(epoch_text) <= 19):
        raise BootstrapClientError(f"{method} {url}: malformed {EPOCH_HEADER}: {epoch_text!r}")
    return decoded, int(epoch_text)


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    kind: type[Any],
    timeout_s: float,
    **kwargs: Any,
) -> Any:
    """One request; the 200 body decoded as `kind`, else BootstrapClientError."""
    return (await _call_with_epoch(session, method, url, kind, timeout_s, **kwargs))[0]


async def fetch_server_info(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float
) -> ServerInfo:
    """GET /route. A 503 (workers still registering) raises a retryable error."""
    return await _call(session, "GET", base_url.rstrip("/") + "/route", ServerInfo, timeout_s)


async def fetch_worker(
    session: aiohttp.ClientSession, base_url: str, rank: int, timeout_s: float
) -> WorkerRegistration:
    """GET /route?prefill_dp_rank=rank: that worker's KV endpoint and layout (404: unknown)."""
    url = f"{base_url.rstrip('/')}/route?prefill_dp_rank={int(rank)}"
    return await _call(session, "GET", url, WorkerRegistration, timeout_s)


async def query_dp_ranks(
    session: aiohttp.ClientSession, base_url: str, rooms: list[int], timeout_s: float
) -> dict[int, int | RoomFailure]:
    """POST /query_dp_ranks: the rank or the failure of each known room; unknown rooms are
    absent from the answer (not registered yet, or expired)."""
    return (await query_dp_ranks_with_epoch(session, base_url, rooms, timeout_s))[0]


async def query_dp_ranks_with_epoch(
    session: aiohttp.ClientSession, base_url: str, rooms: list[int], timeout_s: float
) -> tuple[dict[int, int | RoomFailure], int | None]:
    """`query_dp_ranks`, and the restart epoch of the server that answered (None from a
    server that does not say)."""
    url = base_url.rstrip("/") + "/query_dp_ranks"
    answer, epoch = await _call_with_epoch(
        session, "POST", url, _RankAnswer, timeout_s, json={"bootstrap_rooms": rooms}
    )
    asked = set(rooms)
    result: dict[int, int | RoomFailure] = {}
    for key, value in answer.items():
        room = int(key) if key.isascii() and key.isdigit() else None
        if room is None or room not in asked:
            raise BootstrapClientError(f"POST {url}: answer names a room not asked for: {key!r}")
        result[check_room(room)] = value
    return result, epoch


async def post_room_failure(
    session: aiohttp.ClientSession,
    base_url: str,
    room: int,
    error: str,
    status: int,
    secret: str | None,
    timeout_s: float,
    attempt_timeout_s: float = FAILURE_ATTEMPT_TIMEOUT_S,
    origin: str | None = None,
) -> None:
    """POST /register_dp_rank with an error: the room failed on this side (`origin`: the
    side at fault, "decode" or "prefill", where known). Asked again while the server gives
    no answer or a 5xx (stopped, busy, restarting), until `timeout_s`: a failure it never
    hears leaves the prefill leg waiting for a page list until its own deadline, holding its
    request (and its pages) meanwhile."""
    fields: dict[str, object] = {"bootstrap_room": room, "error": error, "status": status}
    if origin is not None:  # a server older than the field ignores it
        fields["origin"] = origin
    body = msgspec.json.encode(fields)
    url = base_url.rstrip("/") + "/register_dp_rank"
    deadline = time.monotonic() + timeout_s
    interval_s = RETRY_INTERVAL_S
    while True:
        headers = write_headers(secret, "POST", "/register_dp_rank", body)  # a fresh proof
        remaining_s = max(deadline - time.monotonic(), 0.01)
        try:
            await _call(
                session, "POST", url, dict, min(attempt_timeout_s, remaining_s),
                data=body, headers=headers,
            )  # fmt: skip
            return
        except BootstrapClientError as exc:
            if not exc.retryable or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(min(interval_s, max(deadline - time.monotonic(), 0.0)))  # backoff
        interval_s = min(interval_s * 2, MAX_FAILURE_RETRY_INTERVAL_S)
