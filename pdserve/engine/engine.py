"""The inference engine a worker process drives: add requests, call step(), collect outputs.

It knows nothing of disaggregation beyond a few hooks: a `prefill_only` request stops after
its first token with its pages held (SENDING_KV) until `release()`, and that step's output
hands their ids over (`StepOutput.held_page_ids`); on the decode side
`reserve()` allocates pages for a prompt whose KV will arrive, and `admit_prefilled()`
starts decoding it from the first token. A prefix cache (on by default) keeps finished
requests' full pages for later requests with the same prefix.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch

from pdserve.engine.config import AUTO_MAX_KV_BYTES, AUTO_MAX_TOTAL_TOKENS, EngineConfig
from pdserve.engine.kv_events import CacheEvent
from pdserve.engine.kv_layout import KVLayout
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.outputs import OutputBuilder
from pdserve.engine.overlap import LaunchedDecode
from pdserve.engine.page_allocator import PageAllocator
from pdserve.engine.page_hash import hash_seed
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.request import (
    FinishReason,
    ReqState,
    Request,
    RequestRejected,
    StepOutput,
)
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Batch, Scheduler, pages_for

log = logging.getLogger(__name__)

Detokenize = Callable[[list[int]], str]


def _overlappable(batch: Batch) -> bool:
    """A decode step whose outputs need no logits on the host (no logprobs)."""
    if batch.prefill or not batch.decode:
        return False
    return not any(r.return_logprob for r in batch.decode)


def _num_pool_tokens(cfg: EngineConfig, context_len: int, kv_bytes_per_token: int) -> int:
    if cfg.max_total_tokens is not None:
        return cfg.max_total_tokens
    wanted = min(cfg.max_running_requests * context_len, AUTO_MAX_TOTAL_TOKENS)
    return max(cfg.page_size, min(wanted, AUTO_MAX_KV_BYTES // kv_bytes_per_token))


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        model: LoadedModel,
        detokenize: Detokenize | None = None,
        dp_rank: int = 0,
    ):
        self.cfg = cfg = cfg.with_dtype(model.model_dir)
        self.model = model
        args = model.args
        self.page_size = cfg.page_size
        self.max_context_len = cfg.context_length or args.max_position_embeddings
        if args.sliding_window is not None and self.max_context_len > args.sliding_window:
            raise ValueError(
                f"--context-length {self.max_context_len} exceeds the model's sliding_window "
                f"({args.sliding_window}): sliding-window attention is not supported"
            )
        self.eos_token_ids = model.eos_token_ids
        self.model_fingerprint = model.fingerprint
        dtype = getattr(torch, cfg.dtype)
        kv_bytes_per_token = (
            args.num_layers * 2 * args.num_kv_heads * args.head_dim * dtype.itemsize
        )
        num_tokens = _num_pool_tokens(cfg, self.max_context_len, kv_bytes_per_token)
        self.num_total_pages = num_tokens // cfg.page_size
        # Page-major: one page's KV for every layer is one contiguous run of bytes.
        self.kv_pool = torch.empty(
            (
                self.num_total_pages,
                args.num_layers,
                2,
                cfg.page_size,
                args.num_kv_heads,
                args.head_dim,
            ),
            dtype=dtype,
            device=torch.device(cfg.device),
        )
        self.allocator = PageAllocator(self.num_total_pages)
        self.prefix_cache = None if cfg.disable_radix_cache else PrefixCache(self.allocator)
        self.scheduler = Scheduler(
            self.allocator,
            cfg.page_size,
            cfg.max_running_requests,
            cfg.chunked_prefill_size,
            self.prefix_cache,
            hash_seed(self.model_fingerprint, cfg.page_size),
        )
        self.runner = self._make_runner(cfg, model)
        self.outputs = OutputBuilder(self.eos_token_ids, detokenize)
        # Overlap: a decode step is launched before the previous one's tokens are read.
        # The benchmark flips it between runs, only while nothing is in flight.
        self.overlap = cfg.overlap_schedule == "on" or (
            cfg.overlap_schedule == "auto" and self.kv_pool.device.type == "cuda"
        )
        self._in_flight: LaunchedDecode | None = None
        self._requests: dict[str, Request] = {}
        # Seeds for requests that give none, a stream per DP rank: ranks drawing alike gave
        # the k-th such request of each the same tokens (equal pairs among n choices).
        self._seed_rng = random.Random(cfg.random_seed + (dp_rank << 64))

    def _make_runner(self, cfg: EngineConfig, model: LoadedModel) -> ModelRunner:
        if self.kv_pool.device.type != "cuda":
            return ModelRunner(model, self.kv_pool, cfg.page_size, self.max_context_len)
        from pdserve.engine.gpu.runner import GpuModelRunner  # needs CUDA and Triton

        return GpuModelRunner(
            model,
            self.kv_pool,
            cfg.page_size,
            self.max_context_len,
            cfg.max_running_requests,
            cfg.cuda_graphs and cfg.runs_decode,
            cfg.decode_gemv == "on",
        )

    @classmethod
    def from_config(
        cls, cfg: EngineConfig, detokenize: Detokenize | None = None, dp_rank: int = 0
    ) -> Engine:
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.random_seed)
        cfg = cfg.with_dtype()
        model = load_model(
            cfg.model_path,
            getattr(torch, cfg.dtype),
            torch.device(cfg.device),
            cpu_packed_weights=cfg.cpu_packed_weights,
        )
        return cls(cfg, model, detokenize, dp_rank)

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages a request can get: free ones and unreferenced cached ones (evictable)."""
        return self.scheduler.pages.num_available

    @property
    def num_used_pages(self) -> int:
        """Pages held by live requests (held and reserved ones too); 0 when idle, however
        full the cache."""
        return self.scheduler.pages.num_used

    @property
    def num_cached_pages(self) -> int:
        return self.prefix_cache.num_cached_pages if self.prefix_cache else 0

    @property
    def num_evictable_pages(self) -> int:
        return self.scheduler.pages.num_evictable

    @property
    def num_preemptions(self) -> int:
        """Running requests sent back to wait for pages since start (lifetime count)."""
        return self.scheduler.num_preemptions

    def kv_layout(self) -> KVLayout:
        args = self.model.args
        return KVLayout(
            page_size=self.page_size,
            kv_dtype=self.cfg.dtype,
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            model_fingerprint=self.model_fingerprint,
        )

    def has_work(self) -> bool:
        """True while step() would compute something. Held and reserved requests, and
        waiting ones blocked on their pages, wait on outside events (release, abort, KV).
        A decode step in flight is work: its tokens are still to be collected."""
        return self._in_flight is not None or self.scheduler.has_runnable()

    def load(self) -> tuple[int, int, int]:
        """(num_running, num_waiting, num_tokens); waiting includes requests awaiting KV."""
        num_tokens = sum(r.seq_len for r in self._requests.values())
        return (*self.num_reqs(), num_tokens)

    def num_reqs(self) -> tuple[int, int]:
        """(num_running, num_waiting) of `load`, without the tokens' sum over requests."""
        s = self.scheduler
        return len(s.running) + len(s.prefilling), len(s.waiting) + len(s.reserved)

    def get(self, rid: str) -> Request | None:
        return self._requests.get(rid)

    def oldest_waiting(self) -> Request | None:
        """The waiting request the scheduler admits next (a preempted one first), or None."""
        waiting = self.scheduler.waiting
        return waiting[0] if waiting else None

    def pause_waiting(self, paused: bool) -> None:
        """Decode role: admit no waiting request while `paused` (a room that came before
        them waits for a request slot or pages, which they would take)."""
        self.scheduler.waiting_paused = paused

    def cache_stats(self) -> dict[str, int]:
        """Prefix cache figures for load reports (the lifetime counters never decrease)."""
        cache = self.prefix_cache
        return {
            "num_cached_pages": self.num_cached_pages,
            "num_evictable_pages": self.num_evictable_pages,
            "cache_lookup_tokens": cache.num_lookup_tokens if cache else 0,
            "cache_hit_tokens": cache.num_hit_tokens if cache else 0,
            "cache_evicted_pages": cache.num_evicted_pages if cache else 0,
        }

    def flush_cache(self) -> int:
        """Drop every cached page no request pins (pinned ones stay: requests use them);
        returns how many were dropped. Safe while requests run."""
        return self.prefix_cache.flush() if self.prefix_cache else 0

    def drain_cache_events(self) -> list[CacheEvent]:
        """The prefix cache's changes since the last call, in order."""
        return self.prefix_cache.events.drain() if self.prefix_cache else []

    def cached_page_hashes(self) -> list[int]:
        return self.prefix_cache.page_hashes() if self.prefix_cache else []

    # ---- request entry ----------------------------------------------------------------
    def check_admissible(self, req: Request) -> None:
        """Raise RequestRejected for a request that could never run here."""
        if req.rid in self._requests:
            raise RequestRejected(f"request id {req.rid!r} is already in flight")
        vocab_size = self.model.args.vocab_size
        try:
            req.sampling.validate(vocab_size)
        except ValueError as exc:
            raise RequestRejected(str(exc)) from exc
        prompt_len = len(req.prompt_ids)
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty")
        if any(not 0 <= t < vocab_size for t in req.prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab_size})")
        total = prompt_len + req.sampling.max_new_tokens
        if total > self.max_context_len:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({req.sampling.max_new_tokens}) "
                f"= {total} exceeds the context length {self.max_context_len}"
            )
        # A prefill_only request holds its prompt's pages only: its answer is decode's.
        kv_len, what = (
            (prompt_len, "prompt") if req.prefill_only else (total, "prompt + max_new_tokens")
        )
        if pages_for(kv_len, self.page_size) > self.num_total_pages:
            raise RequestRejected(
                f"{what} = {kv_len} tokens needs more KV pages than the pool "
                f"has ({self.num_total_pages} pages of {self.page_size} tokens)"
            )
        if req.state is not ReqState.WAITING or req.output_ids:
            raise RequestRejected(f"request {req.rid!r} is not new (state {req.state.value})")

    def _register(self, req: Request) -> None:
        seed = req.sampling.seed
        req.sampling_seed = seed if seed is not None else self._seed_rng.getrandbits(63)
        self._requests[req.rid] = req

    def add_request(self, req: Request) -> None:
        self.check_admissible(req)
        self._register(req)
        self.scheduler.add(req)

    # ---- stepping ----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step; returns what requests produced since the last call. With overlap,
        a decode step is launched and the previous step's tokens are returned: each step's
        tokens come one call late, and a request that stopped in the previous step has a
        row in the launched one whose token is dropped (never emitted)."""
        in_flight = self._in_flight
        batch = self.scheduler.schedule(set(in_flight.reqs) if in_flight else ())
        if self.overlap and _overlappable(batch):
            return self._launch(batch) + self._collect(in_flight)
        outputs = self._collect(in_flight)
        # The batch was scheduled with room for the tokens just collected; drop requests
        # they stopped. Its rows now read those tokens from the host.
        batch.decode = [r for r in batch.decode if r.state is ReqState.RUNNING]
        if batch.empty:
            return outputs
        try:
            self.runner.zero_pages(batch.new_page_ids)
            logits, items = self.runner.run(batch)
            step_outputs = self.outputs.process(logits, items)
        except Exception as exc:  # a failed step fails its requests, never the worker
            log.exception("engine step failed")
            return outputs + self._fail_batch(batch, f"engine step failed: {exc!r}")
        for out in step_outputs:
            self._settle(out)
        return outputs + step_outputs

    def _launch(self, batch: Batch) -> list[StepOutput]:
        """Queue the decode step (its outputs come with the next call)."""
        try:
            self.runner.zero_pages(batch.new_page_ids)
            self._in_flight = self.runner.launch_decode(batch.decode, self._in_flight)
        except Exception as exc:
            log.exception("engine step failed")
            return self._fail_batch(batch, f"engine step failed: {exc!r}")
        return []

    def _collect(self, launched: LaunchedDecode | None) -> list[StepOutput]:
        """The tokens of a launched decode step, for the requests still running: one that
        stopped, was aborted or preempted since the launch has its token dropped."""
        if launched is None:
            return []
        if self._in_flight is launched:
            self._in_flight = None
        try:
            token_ids = launched.token_ids()
        except Exception as exc:
            log.exception("engine step failed")
            return self._fail_batch(Batch(decode=launched.reqs), f"engine step failed: {exc!r}")
        decoded = [
            (req, token_id)
            for req, token_id in zip(launched.reqs, token_ids, strict=True)
            if req.state is ReqState.RUNNING
        ]
        outputs = self.outputs.process_decoded(decoded)
        for out in outputs:
            self._settle(out)
        return outputs

    def _settle(self, out: StepOutput) -> None:
        """Move a request on after its step output: finish, hold or keep going."""
        req = self._requests[out.rid]
        if out.kv_ready:
            out.held_page_ids = self.scheduler.hold(req)
        elif out.finish_reason is not None:
            req.finish_reason = out.finish_reason
            self._requests.pop(req.rid)
            self.scheduler.finish(req, ReqState.FINISHED)
        elif req.state is ReqState.PREFILLING and req.num_computed == req.seq_len - 1:
            self.scheduler.on_prefilled(req)

    def _fail_batch(self, batch: Batch, message: str) -> list[StepOutput]:
        reqs = [c.req for c in batch.prefill] + batch.decode
        outputs = []
        for req in reqs:
            if self._requests.pop(req.rid, None) is None:
                continue
            req.error = message
            req.finish_reason = FinishReason("abort", message=message)
            self.scheduler.finish(req, ReqState.FAILED)
            outputs.append(StepOutput(req.rid, finish_reason=req.finish_reason, error=message))
        return outputs

    def abort(
        self, rid: str, reason: str, keep_page_ids: list[int] | None = None
    ) -> StepOutput | None:
        """Abort a request in any live state, freeing its pages (held or reserved too), but
        `keep_page_ids`, which a KV transfer may still write (decode) or read (prefill):
        those stay unchanged and out of use until `release_pages`."""
        req = self._requests.pop(rid, None)
        if req is None:
            return None
        if keep_page_ids:
            self.scheduler.pages.set_aside(req, keep_page_ids)
        req.finish_reason = FinishReason("abort", message=reason)
        self.scheduler.finish(req, ReqState.ABORTED)
        return StepOutput(rid, finish_reason=req.finish_reason, cached_tokens=req.cached_tokens)

    free_reserved = abort

    def release_pages(self, page_ids: list[int]) -> None:
        """Pages kept by `abort(keep_page_ids=...)` are no longer written or read."""
        self.scheduler.pages.release_set_aside(page_ids)

    # ---- PD hooks ----------------------------------------------------------------------
    def release(self, rid: str) -> None:
        """Prefill role: the held pages were sent; free them and finish the request."""
        req = self._requests.get(rid)
        if req is None:
            return
        if req.state is not ReqState.SENDING_KV:
            raise ValueError(f"release({rid!r}): request is {req.state.value}, not sending_kv")
        self._requests.pop(rid)
        self.scheduler.finish(req, ReqState.FINISHED)

    def reserve(self, req: Request, use_cache: bool = False) -> list[int] | None:
        """Decode role: pages for the prompt's KV (WAITING_FOR_KV). With `use_cache`, the
        cached prefix it matches is pinned (`req.cached_tokens` tokens, page-aligned, at
        most prompt length - 1) and only the rest is allocated. Returns the new pages, the
        ones the KV transfer must fill (never empty); None, with nothing taken, when there
        is no room now; RequestRejected if there never is."""
        self.check_admissible(req)
        page_ids = self.scheduler.reserve(req, use_cache)
        if page_ids is None:
            return None
        self._register(req)
        self.runner.zero_pages(page_ids)
        return page_ids

    def prefix_arriving(self, req: Request, arriving: list[Request]) -> bool:
        """Decode role: whether the KV these reserved requests are receiving will extend the
        cached prefix this prompt matches (reserving after it lands moves fewer pages)."""
        return self.scheduler.pages.gains_from(req, arriving)

    def admit_prefilled(
        self,
        rid: str,
        first_token_id: int,
        first_logprob: float | None = None,
        first_top_logprobs: list[tuple[int, float]] | None = None,
    ) -> list[StepOutput]:
        """Decode role: the prompt KV is in the reserved pages; decode continues from the
        first token, which the returned output carries (so the client sees every token)."""
        req = self._requests.get(rid)
        if req is None or req.state is not ReqState.WAITING_FOR_KV:
            state = "unknown" if req is None else req.state.value
            raise ValueError(f"admit_prefilled({rid!r}): request is {state}, not waiting_for_kv")
        if not 0 <= first_token_id < self.model.args.vocab_size:
            out = self.abort(rid, f"first token id {first_token_id} is out of the vocabulary")
            return [out] if out else []
        self.scheduler.admit_reserved(req)
        out = self.outputs.admit_first(req, first_token_id, first_logprob, first_top_logprobs)
        self._settle(out)
        return [out]
