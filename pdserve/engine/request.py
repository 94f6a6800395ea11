"""A request's life inside a worker: sampling parameters, one state enum, one transition().

Pure (no torch, no I/O). Runs in the worker process; `SamplingParams` and `FinishReason`
also travel front end <-> worker as msgspec structs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:  # type only: this module stays torch-free
    from pdserve.engine.penalty_ids import PenaltyIds

INT64_MAX = 2**63 - 1
# logit_bias: at most this many tokens per request (bounds the work it adds to each step);
# each bias is in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT], OpenAI's range.
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100.0


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # SGLang's convention: -1 (or 0) means no top-k
    min_p: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    # Over the output so far: logits[t] -= frequency * count[t] + presence * (count[t] > 0).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Over prompt and output: a seen token's logit is divided by it if positive, else times it.
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many
    # token id -> added to its logit before any token is picked (greedy too)
    logit_bias: dict[int, float] = {}

    @property
    def penalized(self) -> bool:
        """Whether sampling must look at the request's tokens (costs a count per step)."""
        return (
            self.frequency_penalty != 0
            or self.presence_penalty != 0
            or self.repetition_penalty != 1
            or self.min_new_tokens > 0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidSampling naming the bad field; the front end turns it into a 400.
        `vocab_size`: the model's, bounding token ids (None: unknown, unchecked)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            _bad("max_new_tokens", "a non-negative integer", self.max_new_tokens)
        if not self.temperature >= 0:  # NaN too: it would sample garbage, not fail
            _bad("temperature", ">= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            _bad("top_p", "in (0, 1]", self.top_p)
        if not -1 <= self.top_k <= INT64_MAX:
            _bad("top_k", "-1 (disabled) or a positive 64-bit integer", self.top_k)
        if not 0 <= self.min_p <= 1:
            _bad("min_p", "in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:  # NaN too
                _bad(name, "in [-2, 2]", getattr(self, name))
        if not 0 < self.repetition_penalty < float("inf"):
            _bad("repetition_penalty", "> 0", self.repetition_penalty)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            _bad(
                "min_new_tokens",
                f"in [0, {self.max_new_tokens}] (the maximum)",
                self.min_new_tokens,
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSampling("stop", "must be a list of non-empty strings")
        # Past 64 bits an int cannot reach a worker (msgpack): a 400 here, not a 500 there.
        if any(not -INT64_MAX - 1 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise InvalidSampling("stop_token_ids", "must be 64-bit integers")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            _bad("seed", "a 64-bit integer", self.seed)
        check_logit_bias(self.logit_bias, vocab_size)


def check_logit_bias(bias: dict[int, float], vocab_size: int | None) -> None:
    """Raise InvalidSampling("logit_bias", ...) naming the first bad token id or bias."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidSampling(
            "logit_bias",
            f"has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
        )
    # Past 64 bits a key cannot reach a worker (msgpack); without a vocab size, that bounds it.
    limit = INT64_MAX + 1 if vocab_size is None else vocab_size
    for token_id, value in bias.items():
        if not 0 <= token_id < limit:
            raise InvalidSampling(
                "logit_bias", f"token id {token_id} is outside the vocabulary [0, {limit})"
            )
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:  # NaN too
            raise InvalidSampling(
                "logit_bias",
                f"bias {value!r} for token {token_id} must be in "
                f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]",
            )


class InvalidSampling(ValueError):
    """A sampling parameter out of range; the message is `field` followed by `problem`."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _bad(field: str, allowed: str, value: object) -> None:
    raise InvalidSampling(field, f"must be {allowed}, got {value!r}")


class FinishReason(msgspec.Struct, frozen=True):
    """SGLang's meta_info.finish_reason: {"type": "stop"|"length"|"abort", "matched": ...}."""

    type: str
    matched: int | str | None = None
    message: str | None = None


class ReqState(enum.Enum):
    """A request's life inside the engine. The PD transfer around it (bootstrap, page list,
    KV in flight) is the room's state, kept by the disagg worker hooks: a decode request
    reaches the engine only when its pages are reserved (WAITING_FOR_KV)."""

    WAITING = "waiting"  # queued for prefill (colocated and prefill roles)
    PREFILLING = "prefilling"  # some prompt chunks computed
    RUNNING = "running"  # decoding
    WAITING_FOR_KV = "waiting_for_kv"  # decode: pages reserved, page list sent, KV awaited
    SENDING_KV = "sending_kv"  # prefill: first token done, pages held until sent
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


TERMINAL = frozenset({ReqState.FINISHED, ReqState.ABORTED, ReqState.FAILED})

_ALLOWED: dict[ReqState, frozenset[ReqState]] = {
    ReqState.WAITING: frozenset(
        {
            ReqState.PREFILLING,
            ReqState.RUNNING,
            ReqState.SENDING_KV,
            ReqState.WAITING_FOR_KV,  # decode role: pages reserved for the KV to come
        }
    ),
    # FINISHED: max_new_tokens == 0 (prompt scoring) ends right after the prompt is computed.
    ReqState.PREFILLING: frozenset(
        {ReqState.PREFILLING, ReqState.RUNNING, ReqState.SENDING_KV, ReqState.FINISHED}
    ),
    ReqState.RUNNING: frozenset({ReqState.FINISHED, ReqState.WAITING}),  # WAITING: preempted
    ReqState.WAITING_FOR_KV: frozenset({ReqState.RUNNING, ReqState.FINISHED}),
    ReqState.SENDING_KV: frozenset({ReqState.FINISHED}),
}


class IllegalTransition(RuntimeError):
    pass


class RequestRejected(ValueError):
    """A request that can never run on this engine (empty prompt, longer than the context,
    more pages than the pool); the message names the limit. The front end answers 400."""


def can_transition(src: ReqState, dst: ReqState) -> bool:
    if src in TERMINAL:
        return False
    # Aborted or failed are reachable from every live state: failure wins.
    if dst in (ReqState.ABORTED, ReqState.FAILED):
        return True
    return dst in _ALLOWED.get(src, frozenset())


@dataclass(eq=False)  # identity semantics: queues find and remove the very object
class Request:
    """One sequence in a worker. Page ownership: `page_ids` belong to this request until a
    terminal transition, after which the engine returns them to the allocator or the prefix
    cache; the first `num_pinned_pages` are cached pages it shares, pinned, never written."""

    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int | None = None  # None: no prompt logprobs
    top_logprobs_num: int = 0
    prefill_only: bool = False  # prefill role: stop after the first token, hold pages
    # Its prefix-cache salt: it shares cached pages only with requests of the same salt.
    cache_salt: str | None = None
    hash_seed: int | None = None  # its pages' seed under that salt (PagePool, memoised)
    # When it reached its worker (time.monotonic), where the worker orders queues the
    # scheduler does not see (decode's rooms) with its waiting requests; None: not told.
    arrived_at: float | None = None
    state: ReqState = ReqState.WAITING
    output_ids: list[int] = field(default_factory=list)
    page_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pages
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Engine bookkeeping (set by the engine, not by callers).
    sampling_seed: int = 0  # sampling.seed, or one drawn by the engine when that is None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_pinned_pages: int = 0  # page_ids[:num_pinned_pages] are shared cached pages it pins
    page_hashes: list[int] = field(default_factory=list)  # of its full pages, memoised
    prompt_logprobs: list[float | None] | None = None  # accumulated over prefill chunks
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_logprobs_sent: bool = False  # sent once; a recomputed (preempted) prefill skips them
    penalty_ids: PenaltyIds | None = None  # a penalized request's ids on the device

    def transition(self, dst: ReqState) -> None:
        if not can_transition(self.state, dst):
            raise IllegalTransition(f"request {self.rid}: {self.state.value} -> {dst.value}")
        self.state = dst

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, position: int) -> int:
        num_prompt = len(self.prompt_ids)
        return (
            self.prompt_ids[position]
            if position < num_prompt
            else self.output_ids[position - num_prompt]
        )

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len is not None


@dataclass
class StepOutput:
    """What one engine step produced for one request (tokens since the previous output)."""

    rid: str
    new_token_ids: list[int] = field(default_factory=list)
    new_token_logprobs: list[float] = field(default_factory=list)  # only with return_logprob
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Prompt logprobs, sent once: entry k is prompt token logprob_start_len + k given the
    # tokens before it (None for token 0, which has no context).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_ready: bool = False  # prefill role: first token sampled, pages held until release()
    # Set by the engine with kv_ready: the held pages, the caller's to send until release().
    held_page_ids: list[int] | None = None
