"""The request path of the router: parse, choose a pair, run attempts with retries, answer
errors as `{"error": {"message": ...}}` (router process)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from pdserve.router.attempt import Attempt
from pdserve.router.body import BadRequest, estimate_tokens, num_sequences, prompt_of
from pdserve.router.config import RouterConfig
from pdserve.router.http_client import HttpClient
from pdserve.router.http_server import Request, Response, StreamResponse, json_response
from pdserve.router.legs import LegError, abort
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import NoWorker, PairChooser
from pdserve.router.workers import Worker

log = logging.getLogger(__name__)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": {"message": message, "code": status}}, status)


class Proxy:
    def __init__(self, config: RouterConfig, chooser: PairChooser, metrics: RouterMetrics):
        self.config = config
        self.chooser = chooser
        self.metrics = metrics
        # Keep-alive connections to every worker, no cap; legs, aborts and health checks.
        self.client = HttpClient(config.connect_timeout_s)
        self.leg_timeout_s = config.request_timeout_s
        self._background: set[asyncio.Task] = set()

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.client.close()

    async def handle(self, request: Request, route: str) -> Response | StreamResponse:
        started = time.perf_counter()
        self.metrics.requests.inc(route)
        try:
            body = msgspec.json.decode(request.body)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            num_seqs = num_sequences(route, body)
        except (msgspec.DecodeError, BadRequest) as exc:
            self.count_failure(route, "bad_request")
            return error_response(400, f"bad request: {exc}")
        try:
            response, decode_s = await self._attempts(request, route, body, num_seqs)
        except asyncio.CancelledError:
            self.count_failure(route, "client_disconnect")
            raise
        except Exception as exc:  # a router bug must still answer in the error format
            log.exception("router error on %s", route)
            self.count_failure(route, "router_error")
            return error_response(500, f"router error: {exc!r}")
        total_s = time.perf_counter() - started
        self.metrics.duration.observe(total_s, route)
        if response.status == 200:
            self.metrics.added_latency.observe(max(0.0, total_s - decode_s), route)
        return response

    async def _attempts(
        self, request: Request, route: str, body: dict[str, Any], num_seqs: int | None
    ) -> tuple[Response | StreamResponse, float]:
        prompt = prompt_of(route, body)
        tokens = estimate_tokens(prompt, num_seqs)
        failed: set[str] = set()
        last: LegError | None = None
        for attempt_no in range(self.config.max_retries + 1):
            if attempt_no:
                self.metrics.retries.labels(route).inc()
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt_no - 1))
            try:
                pair = self.chooser.choose(route, body, num_seqs, prompt, time.monotonic(), failed)
            except NoWorker as exc:
                if last is not None:
                    break
                self.count_failure(route, "no_worker")
                return error_response(503, str(exc)), 0.0
            attempt = Attempt(self, request, route, body, pair, tokens)
            try:
                return await attempt.run(), attempt.decode_s
            except LegError as err:
                log.warning("attempt %d of %s failed: %s", attempt_no + 1, route, err)
                last = err
                failed.add(err.worker.url)
                if not err.retryable:
                    break
        assert last is not None
        self.count_failure(route, last.reason)
        return error_response(last.status, last.client_message), 0.0

    def count_leg(self, worker: Worker) -> None:
        self.metrics.worker_requests.inc(worker.url, worker.role)

    def count_leg_failure(self, worker: Worker, reason: str) -> None:
        self.metrics.worker_failures.labels(worker.url, worker.role, reason).inc()

    def count_failure(self, route: str, reason: str) -> None:
        self.metrics.failures.labels(route, reason).inc()

    def keep(self, task: asyncio.Task) -> None:
        """Hold a background task until it ends (the loop only keeps weak references)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abort_leg(self, worker: Worker, rids: list[str], cause: str) -> None:
        self.metrics.aborts.labels(worker.role, cause).inc()
        if rids:
            self.keep(
                asyncio.create_task(abort(self.client, worker, rids, self.config.abort_timeout_s))
            )
