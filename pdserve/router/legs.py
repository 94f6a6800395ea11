"""One leg of a request: POST to a worker, classify its failure, abort it; and what all
legs share (router process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from pdserve.router.config import RouterConfig
from pdserve.router.http_client import (
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HttpClient,
    HttpError,
    Response,
    ResponseTimeout,
)
from pdserve.router.merge import (
    ErrorDetails,
    SSEBuffer,
    error_details,
    error_message,
    event_error,
    event_json,
)
from pdserve.router.metrics import RouterMetrics
from pdserve.router.workers import Worker
from pdserve.serving.hooks import DECODE_ORIGIN, PREFILL_ORIGIN, SHUTTING_DOWN, error_object
from pdserve.serving.request_id import REQUEST_ID_HEADER

log = logging.getLogger(__name__)
NO_DETAILS = ErrorDetails()
T = TypeVar("T")


class LegError(Exception):
    """A leg failed. `status` is what the client gets; `retryable` whether a new pair may
    succeed (connect errors, disconnects, 408/429/5xx); `answered` whether `message` is the
    worker's own error message (else it says what went wrong on the way); `details`, the
    `type`, `param` and `origin` of the worker's error, relayed as they were. The worker's
    address is in str() (for the log) and in `to_json()`'s own field, never in the message."""

    def __init__(
        self,
        worker: Worker,
        status: int,
        message: str,
        reason: str,
        retryable: bool,
        answered: bool = False,
        details: ErrorDetails = NO_DETAILS,
    ):
        super().__init__(f"{worker.role} {worker.url}: {message}")
        self.worker = worker
        self.status = status
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.answered = answered
        self.details = details

    @property
    def client_fault(self) -> bool:
        """The worker refused the request itself (a 4xx other than 408/429): the same
        request fails on any worker, and this one did nothing wrong."""
        return self.answered and 400 <= self.status < 500 and not retryable_status(self.status)

    @property
    def peer_fault(self) -> bool:
        """The worker marks the error as its peer's: a decode server's error its prefill
        peer caused (`origin` "prefill", hooks.PREFILL_ORIGIN), or a prefill server's its
        decode peer caused (`origin` "decode", hooks.DECODE_ORIGIN)."""
        origin = self.details.origin
        return (
            self.answered
            and origin in (PREFILL_ORIGIN, DECODE_ORIGIN)
            and origin != self.worker.role
        )

    @property
    def draining(self) -> bool:
        """The worker's 503 of its drain (SIGTERM), or its peer's relayed: a stop, not a
        fault; the retry avoids the draining server (`at_fault`), and its health checks
        take it out of rotation until it is back."""
        return self.answered and self.status == 503 and self.message == SHUTTING_DOWN

    @property
    def no_verdict(self) -> bool:
        """Says nothing of the worker's health: a request it refused, or a 504 it answered
        (a deadline it enforced on the request: its own --request-timeout-s, or a bootstrap
        or KV wait on its peer; the worker itself is responsive), or an error it marks as
        its peer's (`peer_fault`), or its drain's 503 (`draining`: counted, the requests a
        rolling restart refused opened the breaker, which then kept the restarted server
        out of rotation)."""
        return (
            self.peer_fault
            or self.client_fault
            or self.draining
            or (self.answered and self.status == 504)
        )

    @property
    def client_message(self) -> str:
        return (
            self.message if self.answered else f"{self.worker.role} server failed: {self.message}"
        )

    def to_json(self) -> dict:
        """The `error` object of the router's answer: the server's, plus the worker."""
        worker = {"url": self.worker.url, "role": self.worker.role}
        kind, param, origin = self.details
        error = error_object(self.status, self.client_message, kind, param, origin)
        return {**error, "worker": worker}


def at_fault(err: LegError, prefill: Worker | None, decode: Worker) -> Worker | None:
    """The server of the pair a retry should avoid: the one the error marks as at fault.
    Decode relays its prefill peer's failures (and prefill its decode peer's) in its own
    answer: avoiding the worker that answered sent the retry back to the faulty peer, and
    kept a sound server out of it. None: a peer fault with no such peer in the pair."""
    if not err.peer_fault:
        return err.worker
    return prefill if err.worker is decode else decode


def retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def classify(worker: Worker, exc: BaseException) -> LegError:
    """An HTTP client exception as a LegError."""
    if isinstance(exc, LegError):
        return exc
    if isinstance(exc, ConnectTimeout):
        return LegError(worker, 502, f"connect timed out: {exc}", "connect_timeout", True)
    if isinstance(exc, (ResponseTimeout, asyncio.TimeoutError)):
        return LegError(worker, 504, "no answer before the request deadline", "timeout", False)
    if isinstance(exc, ConnectFailed):
        return LegError(worker, 502, f"cannot connect: {exc.os_error}", "connect", True)
    if isinstance(exc, (ConnectionLost, ConnectionError)):
        return LegError(worker, 502, f"connection lost: {exc!r}", "disconnected", True)
    return LegError(worker, 502, f"{type(exc).__name__}: {exc}", "client_error", True)


async def http_error(worker: Worker, resp: Response) -> LegError:
    try:
        body = await resp.read()
    except HttpError as exc:
        body = repr(exc).encode()
    status = resp.status
    message = error_message(body, status)
    details = error_details(body)
    retryable = retryable_status(status)
    return LegError(worker, status, message, f"http_{status}", retryable, True, details)


def stream_event_error(worker: Worker, obj: object) -> LegError | None:
    """An in-stream `{"error": ...}` event as a LegError (status from its `code`, else 500)."""
    message = event_error(obj)
    if message is None:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    details = error_details(msgspec.json.encode(obj))
    retryable = retryable_status(status)
    return LegError(worker, status, message, f"stream_{status}", retryable, True, details)


@dataclass
class LegResult:
    body: bytes
    streamed: bool


def request_id_head(request_id: str) -> bytes:
    """The correlation header every leg and abort of a client request carries (a sane
    value: printable ASCII, no space, so it cannot break the head)."""
    return f"{REQUEST_ID_HEADER}: {request_id}\r\n".encode("ascii")


async def post(
    client: HttpClient,
    worker: Worker,
    route: str,
    data: bytes,
    timeout_s: float,
    extra_head: bytes = b"",
) -> Response:
    """Open the leg; raises LegError unless the head says 200."""
    try:
        resp = await client.request("POST", worker.url, route, timeout_s, data, extra_head)
    except Exception as exc:  # noqa: BLE001 - every client failure becomes a LegError
        raise classify(worker, exc) from exc
    if resp.status != 200:
        try:
            raise await http_error(worker, resp)
        finally:
            resp.release()
    return resp


async def read_whole(worker: Worker, resp: Response, streamed: bool) -> LegResult:
    """Read an opened leg to its end; in-stream error events count as failures."""
    try:
        body = await resp.read()
    except Exception as exc:  # noqa: BLE001
        raise classify(worker, exc) from exc
    finally:
        resp.release()
    if streamed and b'"error"' in body:  # parse the events only when one may be an error
        for event in SSEBuffer().feed(body + b"\n\n"):
            err = stream_event_error(worker, event_json(event))
            if err is not None:
                raise err
    return LegResult(body, streamed)


async def read_first_events(worker: Worker, resp: Response, buf: SSEBuffer) -> list[bytes]:
    """Wait for the first whole event of a streamed leg (the point of no return)."""
    while True:
        try:
            data = await resp.read_chunk()
        except Exception as exc:  # noqa: BLE001
            raise classify(worker, exc) from exc
        if not data:
            raise LegError(worker, 502, "stream ended before any event", "empty_stream", True)
        events = buf.feed(data)
        if events:
            err = stream_event_error(worker, event_json(events[0]))
            if err is not None:
                raise err
            return events


def failure(task: asyncio.Task) -> BaseException | None:
    """The exception a finished task raised; None if it is running, succeeded or was cancelled."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()


async def unless_failed(main: Awaitable[T], watch: asyncio.Task | None) -> T:
    """Await `main`, but raise `watch`'s error as soon as `watch` fails first (and cancel
    `main`). A `watch` that succeeds or is cancelled is ignored."""
    if watch is None:
        return await main  # nothing to watch: no task needed
    error = failure(watch)
    if error is not None:
        if asyncio.iscoroutine(main):
            main.close()  # never started: nothing was sent
        raise error
    main_task = asyncio.ensure_future(main)

    def stop_main(done: asyncio.Task) -> None:
        if failure(done) is not None:
            main_task.cancel()

    # A done callback rather than asyncio.wait: no extra future per leg.
    watch.add_done_callback(stop_main)
    try:
        return await main_task
    except BaseException as exc:
        error = failure(watch)
        if error is None or _caller_cancelled(exc):
            raise  # main's own failure, or our caller is being cancelled
        raise error from None
    finally:
        watch.remove_done_callback(stop_main)


def _caller_cancelled(exc: BaseException) -> bool:
    """`exc` is our caller's cancellation, not main's stop by the watch. Python 3.10 has no
    Task.cancelling() (calling it raised AttributeError: every prefill leg failing before
    decode answered gave the client a 500): there, a caller cancelled in the very turn the
    watch failed gets the watch's error, as if that came first."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is not None and cancelling() > 0


async def abort(
    client: HttpClient,
    worker: Worker,
    rids: list[tuple[str, int]],
    timeout_s: float,
    request_id: str,
) -> None:
    """Best effort: ask the worker to drop these (rid, room) legs; never raises."""
    head = request_id_head(request_id)
    for rid, room in rids:
        body = msgspec.json.encode({"rid": rid, "bootstrap_room": room})
        try:
            path = "/abort_request"
            resp = await client.request("POST", worker.url, path, timeout_s, body, head)
            try:
                await resp.read()
            finally:
                resp.release()
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "abort of %s on %s failed: %r [request_id=%s]", rid, worker.url, exc, request_id
            )
            return


class LegContext:
    """What every attempt shares: the client with keep-alive connections to every worker
    (no cap; legs, aborts and health checks), deadlines, metrics, and the background tasks
    (aborts, drains, prefill legs left to end), held until they end."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics):
        self.config = config
        self.metrics = metrics
        self.client = HttpClient(config.connect_timeout_s, api_key=config.api_key)
        self.leg_timeout_s = config.request_timeout_s
        self._background: set[asyncio.Task] = set()

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.client.close()

    def count_leg(self, worker: Worker) -> None:
        self.metrics.worker_requests.inc(worker.url, worker.role)

    def count_leg_failure(self, err: LegError) -> None:
        if not err.client_fault:
            self.metrics.worker_failures.labels(err.worker.url, err.worker.role, err.reason).inc()

    def count_failure(self, route: str, reason: str) -> None:
        self.metrics.failures.labels(route, reason).inc()

    def keep(self, task: asyncio.Task) -> None:
        """Hold a background task until it ends (the loop only keeps weak references)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abort_leg(
        self, worker: Worker, rids: list[tuple[str, int]], cause: str, request_id: str
    ) -> None:
        self.metrics.aborts.labels(worker.role, cause).inc()
        if rids:
            task = asyncio.create_task(
                abort(self.client, worker, rids, self.config.abort_timeout_s, request_id)
            )
            self.keep(task)
