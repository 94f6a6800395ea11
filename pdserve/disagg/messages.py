"""Typed control messages on the KV channel between a decode worker and a prefill worker.

Runs in worker processes on both sides. Control messages are single msgpack frames; KV
bytes travel as raw frames after a `KVHeader` (docs/protocol.md section 5).
"""

from __future__ import annotations

import msgspec

from pdserve.engine.kv_layout import KVLayout

# 2: PageList carries num_cached_tokens and prefill sends only the pages past it.
# 3: registrations, server info and the handshake carry the server's restart epoch.
# 4: PageList carries prompt_digest; prefill sends no KV for a prompt other than its own.
# 5: cuda_ipc's IpcCopy carries page ids packed as int32 bytes.
# 6: cuda_ipc pushes: decode grants pages with a completion slot, prefill writes and sets it.
# 7: decode leases the rooms in its admission queue to prefill (RoomsQueued).
# 8: the handshake names the prefill endpoint decode dialled (covered by the proof: a new
#    field in covered bytes, so an older signed handshake cannot pass; a bump says why).
PROTOCOL_VERSION = 8


class HandshakeProof(msgspec.Struct, frozen=True, kw_only=True):
    """An HMAC of the disagg secret over the rest of the Handshake (see disagg/kv_auth.py)."""

    ts: float
    nonce: str
    mac: str


class Handshake(msgspec.Struct, tag=True, kw_only=True):
    """decode -> prefill, once per (decode worker, prefill worker) pair."""

    decode_id: str  # stable across restarts of one decode server and DP rank
    layout: KVLayout
    epoch: int = 0  # the decode server's restart epoch
    version: int = PROTOCOL_VERSION
    backend: str = "zmq"  # both sides must move bytes the same way
    transfer_meta: bytes = b""  # the backend's KVTransport.handshake_meta (NIXL: agent metadata)
    # The KV endpoint decode dialled: under the proof, so a handshake seen on the wire is
    # good at that prefill worker only, never replayed to another (kv_auth.check).
    prefill_endpoint: str = ""
    proof: HandshakeProof | None = None  # set when decode has a disagg secret

    def version_mismatch(self) -> str | None:
        if self.version != PROTOCOL_VERSION:
            return f"protocol version mismatch: decode={self.version} prefill={PROTOCOL_VERSION}"
        return None

    def mismatch(self, backend: str, layout: KVLayout) -> str | None:
        """Why a prefill worker moving KV with `backend` from `layout` refuses this, or None."""
        version = self.version_mismatch()
        if version is not None:
            return version
        if self.backend != backend:
            return f"transfer backend mismatch: decode={self.backend!r} prefill={backend!r}"
        return layout.mismatch(self.layout)


class HandshakeResult(msgspec.Struct, tag=True, kw_only=True):
    ok: bool
    error: str | None = None
    proof: str | None = None  # prefill's HMAC over decode's nonce, when it has a secret
    epoch: int = 0  # the prefill server's restart epoch
    transfer_meta: bytes = b""  # prefill's KVTransport.handshake_meta, when ok


class PageList(msgspec.Struct, tag=True, kw_only=True):
    """decode -> prefill: where to write room's KV. Either this or the request may come first.

    Decode holds the prompt's first `num_cached_tokens` tokens already (page-aligned, at most
    prompt_len - 1): `dst_page_ids` are for the pages past them only (the delta).
    `prompt_digest` (`disagg.delta.prompt_digest` of decode's prompt) must be prefill's:
    a page list without it gets no KV."""

    room: int
    dst_page_ids: list[int]
    prompt_len: int
    num_cached_tokens: int = 0
    prompt_digest: int | None = None


class FirstToken(msgspec.Struct, frozen=True, kw_only=True):
    """The aux record: prefill's sampled first token and its metadata."""

    room: int  # checked by decode against its own room: a corruption guard
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int = 0


class KVHeader(msgspec.Struct, tag=True, kw_only=True):
    """prefill -> decode, followed by `len(frame_page_counts)` raw frames of page bytes.

    Frame i carries `frame_page_counts[i]` whole pages, in dst_page_ids order. A room's KV
    may come as several header+frames messages; its RoomStatus follows the last one."""

    room: int
    frame_page_counts: list[int]
    page_nbytes: int
    dst_page_ids: list[int] = []  # where this message's pages go, in frame order


class RoomStatus(msgspec.Struct, tag=True, kw_only=True):
    """prefill -> decode: the final word on a room (after its KV frames, on success).

    `error_origin` (of a failure): the side at fault, DECODE_ORIGIN where decode caused it
    (no page list in time, lost or restarted); None for prefill's own. Optional and ignored
    by older peers (msgspec drops unknown fields), so PROTOCOL_VERSION stays."""

    room: int
    ok: bool
    first: FirstToken | None = None
    error: str | None = None
    error_status: int = 500
    error_origin: str | None = None
    # A page list from a connection whose handshake prefill does not hold (it took it for
    # lost, or for an earlier epoch's, while the connection stayed up): handshake again,
    # then send it again. Optional too: an older decode fails the room, as it did.
    handshake_needed: bool = False


class Abort(msgspec.Struct, tag=True, kw_only=True):
    """Either direction: the sender gave up on the room; the receiver frees its pages."""

    room: int
    reason: str


class Redirect(msgspec.Struct, tag=True, kw_only=True):
    """prefill -> decode, answering a page list sent to the room's home worker when the
    prefill server dispatched the room elsewhere (--rank-mismatch forward): send it to
    `kv_endpoint`, the worker that holds the room's KV."""

    room: int
    dp_rank: int
    kv_endpoint: str


class RoomsQueued(msgspec.Struct, tag=True, kw_only=True):
    """decode -> prefill, a lease: `rooms` wait in decode's admission queue for a request
    slot and free pages (sent when they join it, then every quarter of the bootstrap
    deadline). Prefill keeps their requests past that deadline meanwhile; it answers a room
    that failed with its RoomStatus, and one dispatched to another worker with a Redirect."""

    rooms: list[int]


class Ping(msgspec.Struct, tag=True):
    seq: int


class Pong(msgspec.Struct, tag=True):
    seq: int


ChannelMsg = (
    Handshake
    | HandshakeResult
    | PageList
    | KVHeader
    | RoomStatus
    | Abort
    | Redirect
    | RoomsQueued
    | Ping
    | Pong
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChannelMsg)


def encode(msg: ChannelMsg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> ChannelMsg:
    """Raises msgspec.DecodeError / ValidationError on garbage; callers drop such frames."""
    return _decoder.decode(data)
