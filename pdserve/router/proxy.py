"""The request path of the router: parse, choose a pair, run attempts with retries, answer
errors in the servers' shape, `{"error": {"message", "type", "param", "code"}}` (router
process)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import msgspec

from pdserve.router.attempt import Attempt
from pdserve.router.body import BadRequest, estimate_tokens, num_sequences, prompt_of
from pdserve.router.config import RouterConfig
from pdserve.router.content_coding import ACCEPT_ENCODING, UnsupportedCoding, decoded_body
from pdserve.router.http_server import Request, Response, StreamResponse, json_response
from pdserve.router.kv_policy import KVAware
from pdserve.router.legs import LegContext, LegError, at_fault
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import NoWorker, Pair, PairChooser
from pdserve.router.prefix_table import Prompt
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.serving.hooks import LARGE_BODY_BYTES, error_object
from pdserve.serving.request_id import REQUEST_ID_HEADER, new_request_id, sane_request_id

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": error_object(status, message, param=param)}, status, headers)


class Proxy:
    def __init__(
        self,
        config: RouterConfig,
        chooser: PairChooser,
        metrics: RouterMetrics,
        prompt_tokenizer: PromptTokenizer | None = None,
    ):
        self.config = config
        self.chooser = chooser
        self.prompt_tokenizer = prompt_tokenizer  # kv_aware: text and chat -> token ids
        self.metrics = metrics
        self.legs = LegContext(config, metrics)
        self.client = self.legs.client  # also for health checks and side routes

    async def stop(self) -> None:
        await self.legs.stop()

    async def handle(self, request: Request, route: str) -> Response | StreamResponse:
        """The answer to a client's generation request, every one (errors included) with
        its `X-Request-Id`: the client's, if sane, else a new one."""
        request_id = sane_request_id(request.header(REQUEST_ID_HEADER)) or new_request_id()
        response = await self._handle(request, route, request_id)
        if isinstance(response, Response):  # a stream has it already: its head went out
            response.headers = {**(response.headers or {}), REQUEST_ID_HEADER: request_id}
        return response

    async def _handle(
        self, request: Request, route: str, request_id: str
    ) -> Response | StreamResponse:
        started = time.perf_counter()
        self.metrics.requests.inc(route)
        try:
            return await self._answer(request, route, request_id, started)
        finally:  # every request, answered or not (a client that left, a refusal, a bug)
            self.metrics.duration.observe(time.perf_counter() - started, route)

    async def _answer(
        self, request: Request, route: str, request_id: str, started: float
    ) -> Response | StreamResponse:
        try:
            request.body = decoded_body(request.body, request.header("Content-Encoding"))
            body = msgspec.json.decode(request.body)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            num_seqs = num_sequences(route, body)
        except UnsupportedCoding as exc:  # the servers' 415, word for word
            self.legs.count_failure(route, "bad_request")
            return error_response(exc.status, exc.message, headers=ACCEPT_ENCODING)
        except (msgspec.DecodeError, BadRequest, RecursionError) as exc:  # nested too deeply
            self.legs.count_failure(route, "bad_request")
            status = getattr(exc, "status", 400)
            return error_response(status, f"bad request: {exc}", getattr(exc, "param", None))
        tried: list[Pair] = []  # the pair of each attempt
        try:
            response, decode_s = await self._attempts(
                request, route, body, num_seqs, request_id, tried
            )
        except asyncio.CancelledError:
            self.legs.count_failure(route, "client_disconnect")
            raise
        except Exception as exc:  # a router bug must still answer in the error format
            log.exception("router error on %s [request_id=%s]", route, request_id)
            self.legs.count_failure(route, "router_error")
            return error_response(500, f"router error: {exc!r}")
        finally:
            self._count_path(tried[-1] if tried else None)
        if decode_s is not None:  # decode's leg ran to its end: the rest is the router's
            total_s = time.perf_counter() - started
            self.metrics.added_latency.observe(max(0.0, total_s - decode_s), route)
        return response

    def _observe_choice(self, pair: Pair) -> None:
        """kv_aware's match on the chosen workers: once per attempt, each a choice."""
        kv = self.chooser.policies
        if pair.local_prefill:
            self.metrics.kv_matched_tokens.observe(pair.decode_matched_tokens, "decode")
            return
        if pair.prefill is None:
            if isinstance(kv["regular"], KVAware):
                self.metrics.kv_matched_tokens.observe(pair.decode_matched_tokens, "regular")
            return
        for role, matched in (
            ("prefill", pair.prefill_matched_tokens),
            ("decode", pair.decode_matched_tokens),
        ):
            if isinstance(kv[role], KVAware):
                self.metrics.kv_matched_tokens.observe(matched, role)

    def _count_path(self, pair: Pair | None) -> None:
        """A PD request's path, once per request: that of the attempt that answered (or the
        last one tried), however many retries came before."""
        if pair is None or (pair.prefill is None and not pair.local_prefill):
            return
        self.metrics.request_paths.inc("local" if pair.local_prefill else "disaggregated")

    async def _prompt(self, request: Request, route: str, body: dict[str, Any]) -> Prompt | None:
        """The prompt to route on: token ids where the request gives them or the servers'
        tokenizer is loaded (kv_aware hashes only token ids), else its text. A large body
        is tokenized in a thread: megabytes of text take seconds, during which the loop
        moved no other request (the tokenizer releases the GIL)."""
        prompt = prompt_of(route, body)
        if self.prompt_tokenizer is None or not (prompt is None or isinstance(prompt, str)):
            return prompt
        token_ids = self.prompt_tokenizer.token_ids
        if len(request.body) < LARGE_BODY_BYTES:
            return token_ids(route, body) or prompt
        return await asyncio.to_thread(token_ids, route, body) or prompt

    async def _attempts(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        num_seqs: int | None,
        request_id: str,
        tried: list[Pair],
    ) -> tuple[Response | StreamResponse, float | None]:
        """The answer, and the decode leg's own seconds where it ran to its end (None for
        an error answer, a stream that failed or whose client left)."""
        prompt = await self._prompt(request, route, body)
        tokens = estimate_tokens(prompt, num_seqs)
        failed: set[str] = set()
        last: LegError | None = None
        for attempt_no in range(self.config.max_retries + 1):
            if attempt_no:
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt_no - 1))
            try:
                pair = self.chooser.choose(route, body, num_seqs, prompt, time.monotonic(), failed)
            except NoWorker as exc:
                if last is not None:  # no worker left to retry on: no attempt made
                    break
                self.legs.count_failure(route, "no_worker")
                return error_response(503, str(exc)), None
            if attempt_no:
                self.metrics.retries.labels(route).inc()
            self._observe_choice(pair)
            tried.append(pair)
            attempt = Attempt(self.legs, request, route, body, pair, tokens, request_id)
            try:
                return await attempt.run(), attempt.decode_s
            except LegError as err:
                last = err
                if _learned_dp_size(err, pair):  # our rank, from a stale DP size: retry
                    log.info("%s refused a rank the router chose: %s [request_id=%s]",
                             route, err, request_id)  # fmt: skip
                    continue
                if err.client_fault:  # the client's mistake: no retry, no warning
                    log.info("%s refused by %s [request_id=%s]", route, err, request_id)
                    break
                log.warning(
                    "attempt %d of %s failed: %s [request_id=%s]",
                    attempt_no + 1,
                    route,
                    err,
                    request_id,
                )
                culprit = at_fault(err, pair.prefill, pair.decode)
                if culprit is not None:
                    failed.add(culprit.url)
                if not err.retryable:
                    break
        assert last is not None
        self.legs.count_failure(route, last.reason)
        return json_response({"error": last.to_json()}, last.status), None


# A server's refusal of a DP rank past its dp_size (docs/protocol.md section 2.3, verbatim):
# the routed rank of the server that answered (or of its peer, where it relays the peer's
# refusal), or the prefill rank, checked by both legs against the prefill's dp_size.
_ROUTED_OUT_OF_RANGE = re.compile(
    r"\b(?:routed_dp_rank|data_parallel_rank)=\d+ out of range: dp_size is (\d+)\b"
)
_PREFILL_OUT_OF_RANGE = re.compile(
    r"\bdisagg_prefill_dp_rank=\d+ is out of range for prefill dp_size=(\d+)\b"
)


def _learned_dp_size(err: LegError, pair: Pair) -> bool:
    """A refusal of a rank the router chose itself, from a server restarted with fewer DP
    ranks than the router knew (between two of its load reports): that server takes the
    DP size the refusal names, and the request is tried again on ranks that exist. It was
    answered as the client's fault (400, no retry) though the client named no rank."""
    chose_ranks = pair.decode_rank is not None if pair.plan is None else (
        pair.plan.prefill_rank is not None
    )  # fmt: skip
    if not (err.client_fault and chose_ranks):
        return False
    worker = at_fault(err, pair.prefill, pair.decode)
    found = _ROUTED_OUT_OF_RANGE.search(err.message)
    if found is None:
        worker, found = pair.prefill, _PREFILL_OUT_OF_RANGE.search(err.message)
    if found is None or worker is None:
        return False
    dp_size = int(found.group(1))
    if dp_size < 1 or dp_size == worker.dp_size:
        return False
    worker.set_dp_size(dp_size)
    return True
