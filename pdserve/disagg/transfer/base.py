"""The KV transport interface: control messages and KV page bytes between worker processes.

Runs inside every prefill and decode worker process, driven by its single-threaded loop.
Backends: `zmq` (default: ZeroMQ for control, page bytes on a raw TCP connection per peer),
`fake` (control only), `cuda_ipc` (GPU to GPU on one host) and `nixl` (NIXL over UCX: decode
reads the pages); see `make_transport`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NewType

import torch

from pdserve.config import check, opt
from pdserve.disagg import messages as m

if TYPE_CHECKING:
    import zmq

# The endpoint ("tcp://host:port") of a peer this side connected to, with "#n" after it once
# that endpoint was dialed again after a `disconnect`; the peer's own id ("kv-<uuid>") for
# one that connected to this side. Stable while the peer lives.
PeerId = NewType("PeerId", str)


class TransportError(Exception):
    """A send that cannot happen; the caller fails the rooms involved, never the worker."""


class PeerUnreachable(TransportError):
    """The peer is not connected (it vanished, or never was): nothing was queued for it."""


@dataclass(frozen=True)
class Inbound:
    """A decoded control message from `peer`."""

    peer: PeerId
    msg: m.ChannelMsg


@dataclass(frozen=True)
class KVReceived:
    """All KV frames of `room` that arrived are in the pool; comes right before its RoomStatus.

    `num_pages` counts distinct destination pages written; the room is complete when it equals
    `expected_pages` (the length of the PageList this side sent)."""

    peer: PeerId
    room: int
    num_pages: int
    nbytes: int
    expected_pages: int

    @property
    def complete(self) -> bool:
        return self.num_pages == self.expected_pages


@dataclass(frozen=True)
class PeerLost:
    """A queued send to `peer` failed after `send`/`send_kv` returned: fail its rooms."""

    peer: PeerId
    reason: str


@dataclass(frozen=True)
class PagesSettled:
    """Writes that were still under way into these pages when `forget_room` returned them
    have ended: the pages may be reused."""

    page_ids: list[int]


Event = Inbound | KVReceived | PeerLost | PagesSettled


class HeldPages:
    """Pages of forgotten rooms that a transfer under way still reads (prefill) or writes
    (decode), each group with the test that says its transfer has ended."""

    def __init__(self) -> None:
        self._groups: list[tuple[list[int], Callable[[], bool]]] = []

    def hold(self, page_ids: list[int], ended: Callable[[], bool]) -> list[int]:
        if page_ids:
            self._groups.append((page_ids, ended))
        return page_ids

    def settled(self) -> list[PagesSettled]:
        """One event per group whose transfer has ended; those groups are dropped."""
        events, still = [], []
        for page_ids, ended in self._groups:
            if ended():
                events.append(PagesSettled(page_ids))
            else:
                still.append((page_ids, ended))
        self._groups = still
        return events

    def __len__(self) -> int:
        return len(self._groups)


@dataclass(frozen=True)
class TransportOptions:
    frame_nbytes: int = opt(
        2 << 20,
        "KV transfer: target bytes per raw frame (whole pages); on the data connection, per "
        "record where pages are gathered or scattered through a buffer",
    )
    send_hwm_msgs: int = opt(
        1024, "KV transfer: messages ZeroMQ may queue per peer on send (zero-copy: no memory)"
    )
    recv_hwm_msgs: int = opt(
        16, "KV transfer: messages ZeroMQ may buffer per peer on receive (bounds memory)"
    )
    max_queued_msgs: int = opt(
        100_000, "KV transfer: messages queued for one peer before it is declared lost"
    )
    zero_copy_min_nbytes: int = opt(
        256 << 10,
        "KV transfer: source page runs at least this long on average go out zero-copy, one "
        "part per run; shorter ones are gathered into one buffer first",
    )
    keep_freed_memory: bool = opt(
        True,
        "KV transfer: tune glibc malloc (once per process) to reuse freed ZeroMQ receive "
        "buffers instead of returning them to the OS and page-faulting on every new frame",
    )
    data_channel: bool = opt(
        True,
        "KV transfer: a listening side offers each peer that handshakes a raw TCP connection "
        "for page bytes, read straight into pool pages (else they go as ZeroMQ frames)",
    )
    staging_buffers: int = opt(16, "KV transfer: frame-sized buffers for gathering scattered pages")
    heartbeat_interval_s: float = opt(
        0.5, "KV transfer: ZeroMQ heartbeat (ZMTP PING) period on every connection"
    )
    heartbeat_timeout_s: float = opt(
        3.0,
        "KV transfer: a connection silent this long is closed and its peer reported lost; "
        "libzmq's I/O thread answers heartbeats, so a peer busy computing stays alive",
    )
    ipc_lane: bool = opt(
        True,
        "KV transfer (cuda_ipc): control messages go over a Unix datagram socket per worker "
        "(one system call per message) instead of ZeroMQ; both sides must agree",
    )
    lane_spin_us: int = opt(
        0,
        "KV transfer (cuda_ipc): poll(timeout) reads the lane without sleeping for this long "
        "before it blocks: waking a sleeping process costs tens of microseconds (more in a "
        "VM), but a spinning process takes a core from its peer where cores are short",
    )
    grant_ttl_s: float = opt(
        120.0,
        "KV transfer (cuda_ipc): prefill writes nothing into decode's pages this long after "
        "decode granted them; decode keeps a forgotten room's pages whose write was never "
        "confirmed out of use until then (a few seconds more)",
    )
    ipc_slots: int = opt(
        4096, "KV transfer (cuda_ipc): completion slots per decode worker (grants in flight)"
    )
    ipc_status_nbytes: int = opt(
        2048,
        "KV transfer (cuda_ipc): bytes per completion slot for the room's status; a longer "
        "one (many top logprobs) follows as a message",
    )
    read_timeout_s: float = opt(
        30.0,
        "KV transfer (backends where decode reads, nixl): prefill gives up on a room decode "
        "has not read within this long and frees its pages",
    )
    recv_budget_nbytes: int = opt(
        64 << 20, "KV transfer: KV bytes written per poll() before the loop gets control back"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "lane_spin_us":
                check(self.lane_spin_us >= 0, "lane_spin_us must be >= 0")
            elif f.name == "ipc_status_nbytes":  # a slot always holds a status-less payload
                check(self.ipc_status_nbytes >= 64, "ipc_status_nbytes must be >= 64")
            elif f.type in (int, "int", float, "float"):
                check(getattr(self, f.name) > 0, f"{f.name} must be > 0")


class SendHandle(abc.ABC):
    """One `send_kv` in flight. The caller keeps the source pages until `done()`."""

    room: int

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the transport holds no reference to the source pages any more (sent,
        or abandoned with `error` set). Not a delivery receipt: only the peer can give one."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the transfer was abandoned, or None."""


class AckedSend(SendHandle):
    """A send that an event ends: the peer's acknowledgement, or its loss (`finish`).
    Backends where the peer reads the pages (`page_ids`) itself use it."""

    def __init__(self, room: int, page_ids: list[int] | None = None) -> None:
        self.room = room
        self.page_ids = page_ids or []
        self._done = False
        self._error: str | None = None

    def finish(self, error: str | None = None) -> None:
        if not self._done:
            self._done, self._error = True, error

    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> str | None:
        return self._error


def forget_pulled_room(
    room: int,
    batches: dict[PeerId, list],
    sends: dict[tuple[PeerId, int], AckedSend],
    held: HeldPages,
) -> list[int]:
    """forget_room's prefill half where decode reads prefill's pages (`batches`: the copies
    not told to the peer yet, each with a `.room`; `sends`: by peer and room). A copy not told
    yet is dropped: no read can come. One told may still be read: its pages are held until
    the send ends (read and acked, given up by decode, peer lost, or its deadline)."""
    for peer, copies in list(batches.items()):
        if any(c.room == room for c in copies):
            batches[peer] = [c for c in copies if c.room != room]
            handle = sends.pop((peer, room), None)
            if handle is not None:
                handle.finish("room forgotten before it was sent")
    told = [h for (_, r), h in sends.items() if r == room]
    return [p for h in told for p in held.hold(h.page_ids, h.done)]


class KVTransport(abc.ABC):
    """Moves control messages and KV pages between this worker and its peers.

    `pool` is the worker's whole KV pool: one contiguous tensor whose first dimension indexes
    pages, so page `i` is `page_nbytes` contiguous bytes at `i * page_nbytes`. A prefill worker
    listens (`listen_host` given, a free port is bound); a decode worker only connects.

    Contract:
    - `send` and `send_kv` never block on the network: what cannot leave at once is queued per
      peer, in order, and pushed out by later `poll` calls. A peer known to be gone raises
      `PeerUnreachable`; a failure found later surfaces as a `PeerLost` event. Either way
      everything queued for that peer is dropped: fail all of its rooms. A peer that dies
      silently (no TCP reset) is only found by the caller's heartbeat.
    - Sending a `PageList` tells this side which pages that peer may write for that room. KV
      for a room is written into the pool only if it comes from that peer and targets a
      subset of those pages; the permission ends when the room's `RoomStatus` arrives, when an
      `Abort` for the room goes either way, or on `forget_room`. So a late transfer for an
      aborted room can never overwrite pages that were already given to another request.
    - `poll` never raises on what peers send: garbage is counted in `stats`, logged at debug
      and dropped, and nothing outside the announced pages is ever written.

    Backends that move bytes by RDMA fit the same shape: `nixl` registers the pool once,
    exchanges the registration in the handshake (`handshake_meta`/`accept_peer_meta`), and
    moves a room as remote reads of page runs issued by the owner of the destination pages.
    The control channel (ZeroMQ) and the event semantics stay the same.
    """

    name: str = "abstract"

    def __init__(self, pool: torch.Tensor, *, listen_host: str | None = None) -> None:
        if not pool.is_contiguous() or pool.dim() < 1 or pool.shape[0] < 1:
            raise ValueError("KV pool must be a contiguous tensor with at least one page")
        self.pool = pool
        self.num_pages = int(pool.shape[0])
        self.page_nbytes = pool[0].numel() * pool.element_size()
        self.listen_host = listen_host

    @property
    @abc.abstractmethod
    def endpoint(self) -> str | None:
        """The "tcp://host:port" peers connect to, or None if this side does not listen."""

    @abc.abstractmethod
    def connect(self, endpoint: str) -> PeerId:
        """Connect to a listening peer; idempotent per endpoint. Does not wait for the peer."""

    @abc.abstractmethod
    def disconnect(self, peer: PeerId) -> None:
        """Stop dialing a peer `connect` returned and forget it (what is queued for it is
        dropped). A later `connect` to its endpoint dials anew, under another `PeerId`."""

    @abc.abstractmethod
    def send(self, peer: PeerId, msg: m.ChannelMsg) -> None:
        """Queue one control message. Raises PeerUnreachable if the peer is known gone."""

    @abc.abstractmethod
    def send_kv(
        self,
        peer: PeerId,
        room: int,
        src_page_ids: list[int],
        dst_page_ids: list[int],
        then: m.RoomStatus,
    ) -> SendHandle:
        """Send the local pages `src_page_ids` into the peer's `dst_page_ids` (pairwise, same
        length), followed by `then`. Raises ValueError on bad page ids, PeerUnreachable if
        the peer is known gone."""

    def handshake_meta(self) -> bytes:
        """What this side's Handshake (decode) or HandshakeResult (prefill) carries for the
        backend, under the disagg-secret proof (NIXL: agent metadata and pool address)."""
        return b""

    def accept_peer_meta(self, peer: PeerId, meta: bytes) -> str | None:
        """Take the peer's `handshake_meta` from a handshake that passed every other check;
        returns why the peer cannot be used, or None."""
        return None

    @abc.abstractmethod
    def poll(self, timeout_ms: int = 0) -> list[Event]:
        """Push queued sends, take in what arrived (waiting at most `timeout_ms` for the first
        message), write inbound KV into the pool. Never raises on peer input."""

    @abc.abstractmethod
    def forget_room(self, room: int) -> list[int]:
        """Revoke the write permission of `room` (it failed or finished here) and drop what
        of its send has not started. Returns the room's pages that a transfer already under
        way may still write (decode) or read (prefill: a zero-copy frame, a record half
        written, a read decode may still issue), where the backend cannot stop it at once:
        the caller keeps them unchanged and out of use until `poll` reports them in a
        `PagesSettled`. A room's final RoomStatus not yet handed over is dropped too."""

    @abc.abstractmethod
    def busy(self) -> bool:
        """True while sends wait in this transport's queue: only `poll` moves them on, so the
        loop should come back soon. Sends already handed to the backend finish on their own;
        their `SendHandle.done()` turns True without further polling."""

    @abc.abstractmethod
    def sockets(self) -> list[zmq.Socket | int]:
        """Sockets and file descriptors for the worker loop's zmq.Poller (readable means:
        call `poll`). The list is fixed for the transport's life."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop every connection at once (LINGER 0); queued sends are abandoned."""

    @property
    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: messages and KV bytes in and out, garbage dropped by reason."""
