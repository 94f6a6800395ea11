"""What a decode worker knows of each room and of each prefill worker it talks to, and its
admission queue: the rooms that wait for a request slot and free pages, in arrival order,
leased to their prefill workers meanwhile (docs/protocol.md section 5.2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.disagg import messages as m
from pdserve.disagg.rooms import RoomState, transition
from pdserve.engine.request import Request

LEASE_CHECK_S = 0.05  # how often the queue looks for rooms whose lease is due
LOST_PEER_DROP_S = 1.0  # a lost prefill worker unused this long is no longer dialed


@dataclass
class DecodeRoom:
    room: int
    req: Request
    endpoint: str
    prefill_dp_rank: int | None
    deadline: float
    state: RoomState = RoomState.BOOTSTRAPPING
    arrived_at: float = 0.0  # the request, at this worker
    page_list_sent_at: float = 0.0
    # Pages the KV transfer writes: the prompt's pages past the cached prefix decode pinned
    # (`num_cached_tokens`, which the transfer skips).
    dst_page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    # --rank-mismatch forward: when the home worker redirected the page list, and whether
    # it still waits for the handshake with the worker it was redirected to
    redirected_at: float | None = None
    page_list_pending: bool = False
    kv_pages: int = 0
    kv_bytes: int = 0
    epoch: int | None = None  # the prefill epoch its page list went to: KV of others is refused
    leased_at: float = -math.inf  # queued: when its prefill worker was last told so

    @property
    def relay_s(self) -> float | None:
        """Page list sent to the home worker -> its redirect; 0 for a room redirected while
        queued (before its page list); None if not redirected."""
        if self.redirected_at is None:
            return None
        return max(0.0, self.redirected_at - self.page_list_sent_at)

    def move(self, dst: RoomState) -> None:
        self.state = transition(self.room, self.state, dst)

    def first_output_stats(self, now: float) -> dict:
        """The fields of its first output (the KV arrived at `now`) that time the transfer."""
        return {
            "kv_bytes": self.kv_bytes,
            "kv_transfer_s": now - self.page_list_sent_at,
            "stage_s": {
                # handshake, prefill rank and free pages, until the page list left
                "decode_bootstrap": self.page_list_sent_at - self.arrived_at,
                # prefill's compute and send, seen from here
                "decode_kv_wait": now - self.page_list_sent_at,
                # to the first token's output
                "decode_total": time.monotonic() - self.arrived_at,
            },
            "decode_cached_tokens": self.num_cached_tokens,
            "kv_relay_s": self.relay_s,
        }


@dataclass
class Peer:
    """One prefill worker this decode worker talks to."""

    endpoint: str
    peer_id: object
    handshake_ok: bool | None = None  # None: answer not in yet
    handshake_error: str | None = None
    handshake_sent: bool = False
    handshake: m.Handshake | None = None  # as sent: its nonce checks prefill's answer
    epoch: int | None = None  # the prefill server's, from the last handshake answer
    rooms: set[int] = field(default_factory=set)
    lost_at: float | None = None  # its connection dropped, and no handshake went out since

    def handshake_refused_later(self) -> None:
        """Prefill answered a page list with `handshake_needed`: it no longer holds the
        handshake it accepted. A new one goes out, unless one is out already (a second would
        change the nonce its answer is checked against)."""
        if self.handshake_ok:
            self.handshake_ok, self.handshake_sent = None, False

    def unused_since_lost(self, now: float) -> bool:
        """Lost a while ago and not used since: a prefill worker that died, or restarted on
        other ports (the front end resolves the room's endpoint anew), most likely for
        good. The while lets what its last rooms' failures sent leave first."""
        return (
            self.lost_at is not None
            and now - self.lost_at >= LOST_PEER_DROP_S
            and not self.rooms
            and not self.handshake_sent
        )


class AdmissionQueue:
    """Rooms past their handshake that wait for a request slot and free pages, oldest first.

    Waiting here is a queue, not a fault: such a room has no deadline of its own (its
    request's, `--request-timeout-s` on the front end, still ends it). Its prefill worker,
    which holds the request and waits for the page list under `--bootstrap-timeout-s`, gets
    a `RoomsQueued` lease for it at once and then every quarter of that deadline, and keeps
    the request while leases come; a decode that dies or stops serving stops them."""

    def __init__(self, lease_interval_s: float):
        self.lease_interval_s = lease_interval_s
        self._rooms: dict[int, DecodeRoom] = {}
        self._next_check = 0.0

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, room_id: int) -> bool:
        return room_id in self._rooms

    def add(self, room: DecodeRoom) -> None:
        """Queue the room (it keeps its place if queued already) past its handshake."""
        room.deadline = math.inf
        self._rooms.setdefault(room.room, room)

    def discard(self, room_id: int) -> None:
        self._rooms.pop(room_id, None)

    def in_order(self) -> list[DecodeRoom]:
        return list(self._rooms.values())

    def leases_due(self, now: float) -> dict[str, list[int]]:
        """Prefill endpoint -> its rooms to lease now: new ones, and those last leased an
        interval ago (checked every LEASE_CHECK_S)."""
        if now < self._next_check or not self._rooms:
            return {}
        self._next_check = now + LEASE_CHECK_S
        due: dict[str, list[int]] = {}
        for room in self._rooms.values():
            if now - room.leased_at >= self.lease_interval_s:
                room.leased_at = now
                due.setdefault(room.endpoint, []).append(room.room)
        return due


def engine_admits_first(head: Request | None, room: DecodeRoom) -> bool:
    """Whether the engine's next waiting request (`head`) goes before `room`: a local
    prefill that arrived earlier, or a preempted request (first, as a colocated server
    admits it). The engine's next step admits it once a slot and pages are free; rooms are
    reserved in the poll before each step, and took every freed slot from it while they
    kept coming (a local request waited 30 s behind 740 later rooms)."""
    if head is None:
        return False
    if head.output_ids or head.arrived_at is None:
        return True
    return head.arrived_at <= room.arrived_at


def shared_prefix_arriving(
    room: DecodeRoom, reserved: Iterable[DecodeRoom], now: float, max_wait_s: float
) -> list[Request]:
    """The requests of rooms with the same prefill worker whose KV is arriving: where one
    extends the prefix `room`'s prompt finds cached, that worker computes the shared prefix
    once, first, so `room`'s KV is not ready before it lands, and `room` waits before it
    reserves. None once `room` has waited `max_wait_s` for its own KV (its prefill leg may
    never come), nor from a room whose page list went out that long ago (a stuck peer)."""
    if now - room.arrived_at >= max_wait_s:
        return []
    return [
        r.req
        for r in reserved
        if r.endpoint == room.endpoint
        and r.state in (RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING)
        and now - r.page_list_sent_at < max_wait_s
    ]
