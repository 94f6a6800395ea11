"""Typed messages between a server's HTTP front end and its DP worker processes (ZeroMQ).

Front end -> worker: GenerateReq, AbortReq, RoomFailed, RoomForwarded, FlushCache, DumpCache.
Worker -> front end: WorkerReady, WorkerFailed, ReqOutput, WorkerLoad, KVCacheEvents,
CacheDump.
All are msgspec structs encoded with msgpack; no pickled objects cross a process boundary.
"""

from __future__ import annotations

import msgspec

from pdserve.engine.kv_events import CacheEvent
from pdserve.engine.kv_layout import KVLayout
from pdserve.engine.request import FinishReason, SamplingParams


class DisaggInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The PD part of a request, filled in by the front end of a prefill or decode server."""

    room: int
    # decode only: the resolved prefill worker (docs/protocol.md section 4) and its KV endpoint
    prefill_dp_rank: int | None = None
    prefill_endpoint: str | None = None
    prefill_bootstrap: str | None = None  # "host:port" of the prefill bootstrap server


class GenerateReq(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int = 0
    disagg: DisaggInfo | None = None
    cache_salt: str | None = None  # its prefix-cache salt's key (cache_salt.salt_key)


class AbortReq(msgspec.Struct, tag=True):
    rid: str
    reason: str = "aborted by client"


class RoomFailed(msgspec.Struct, tag=True):
    """Prefill front end -> its workers: room failed before dispatch (e.g. a rank conflict),
    so a decode peer that asks for it must be told at once; or decode failed it, so the
    prefill leg of it ends (`origin` DECODE_ORIGIN when that was decode's own fault)."""

    room: int
    reason: str
    status: int = 400  # the HTTP status the decode leg of the room fails with
    origin: str | None = None  # of the prefill leg's error (hooks.DECODE_ORIGIN or None)


class RoomForwarded(msgspec.Struct, tag=True):
    """Prefill front end -> the room's home worker: the room was dispatched to worker
    `dp_rank` (KV endpoint `kv_endpoint`), so a page list for it must be redirected there."""

    room: int
    dp_rank: int
    kv_endpoint: str


class FlushCache(msgspec.Struct, tag=True):
    pass


class DumpCache(msgspec.Struct, tag=True):
    """Front end -> worker: answer with a `CacheDump` (debugging and tests)."""

    dump_id: int  # echoed, so a late answer cannot be taken for a newer ask


class CacheDump(msgspec.Struct, tag=True, kw_only=True):
    dump_id: int
    dp_rank: int
    page_hashes: list[int]  # every page in the worker's prefix cache now


class KVCacheEvents(msgspec.Struct, tag=True, kw_only=True):
    """Worker -> front end: its prefix cache's changes since the last message, in order."""

    dp_rank: int
    events: list[CacheEvent]


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    dp_rank: int
    num_total_pages: int
    page_size: int
    max_context_len: int
    vocab_size: int  # the model's: prompt ids must be below it
    kv_endpoint: str | None = None
    kv_layout: KVLayout | None = None


class WorkerFailed(msgspec.Struct, tag=True, kw_only=True):
    """A worker could not start, or its loop crashed: the front end fails loudly with this."""

    dp_rank: int
    error: str


class ReqOutput(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    """Incremental output of one request: the tokens produced since the previous message."""

    rid: str
    new_token_ids: list[int] = []
    new_token_logprobs: list[float] = []
    # per new token: list of (token_id, logprob), top_logprobs_num long
    new_top_logprobs: list[list[tuple[int, float]]] = []
    # sent once, with the first message, when prompt logprobs were asked for
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    # set when the request failed: the HTTP status and a message for the client
    error_status: int | None = None
    error_message: str | None = None
    error_origin: str | None = None  # hooks.PREFILL_ORIGIN, DECODE_ORIGIN: the peer caused it
    # disaggregation: KV moved for this request and how long it took (for metrics)
    kv_bytes: int = 0
    kv_transfer_s: float | None = None
    # disaggregation: seconds spent in each stage of this worker's leg (for metrics)
    stage_s: dict[str, float] | None = None
    decode_cached_tokens: int = 0  # prompt tokens decode held already: not transferred
    kv_relay_s: float | None = None  # decode: page list to its home worker -> to the redirect


class ReqOutputs(msgspec.Struct, tag=True, kw_only=True):
    """Several requests' outputs of one worker step in one message: one encode and one
    ZeroMQ frame per step instead of one per request (64 outputs: about 60 against 280 us
    of the worker's host time, and a quarter of the front end's receive time)."""

    outputs: list[ReqOutput]


class KVPeersLost(msgspec.Struct, tag=True, kw_only=True):
    """Worker -> front end: the KV connections to these peer endpoints dropped (a decode
    worker's prefill peers died or restarted): what the front end cached of them is stale."""

    dp_rank: int
    endpoints: list[str]


class RoomsUnclaimed(msgspec.Struct, tag=True, kw_only=True):
    """Prefill worker -> front end: decode's page lists for these rooms came here a while
    ago, but no request for them did (the legs may name different prefill ranks)."""

    dp_rank: int
    rooms: list[int]


class WorkerAlive(msgspec.Struct, tag=True, kw_only=True):
    """Worker -> front end every second, from a thread of the worker process: it beats
    while the loop computes a long step, and stops only when the whole process does (stopped,
    or stuck in native code that holds the GIL). It carries the loop's progress, for the
    front end's watchdog: a loop stuck in one step beats with the same `step`."""

    dp_rank: int
    step: int = 0  # turns of the worker's loop so far
    busy: bool = False  # the loop had work to compute when it last turned


class WorkerLoad(msgspec.Struct, tag=True, kw_only=True):
    dp_rank: int
    num_running: int
    num_waiting: int
    num_tokens: int  # tokens held by running + waiting requests
    num_used_pages: int  # held by live requests and transfers (cached pages they pin too)
    num_free_pages: int  # free or holding evictable cache: what a new request can get
    num_total_pages: int
    num_disagg_rooms: int = 0  # PD rooms this worker still tracks (transfer not finished)
    num_kv_peers: int = 0  # PD decode: prefill workers it keeps a KV connection to
    # prefix cache: pages now, and lifetime counters (prompt tokens looked up, found, evicted)
    num_cached_pages: int = 0
    num_evictable_pages: int = 0
    cache_lookup_tokens: int = 0
    cache_hit_tokens: int = 0
    cache_evicted_pages: int = 0
    num_auth_refusals: int = 0  # KV handshakes refused for a wrong proof, since start
    num_preemptions: int = 0  # running requests sent back to wait for pages, since start


ToWorker = GenerateReq | AbortReq | RoomFailed | RoomForwarded | FlushCache | DumpCache
FromWorker = (
    WorkerReady
    | WorkerFailed
    | ReqOutput
    | ReqOutputs
    | WorkerLoad
    | KVCacheEvents
    | CacheDump
    | KVPeersLost
    | RoomsUnclaimed
    | WorkerAlive
)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)
