"""The decode side of the cuda_ipc KV transport, without CUDA: grants made to prefill peers,
each with a completion slot (ipc_flags.py), turned into KVReceived and RoomStatus events
when the slot is set, and a forgotten room's pages kept out of use until no write into them
can come. Runs in decode worker processes (tested on the CPU, the slots set from the host).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.base import Event, Inbound, KVReceived, PagesSettled, PeerId
from pdserve.disagg.transfer.ipc_flags import SlotBoard
from pdserve.disagg.transfer.ipc_pool import IpcGrant, IpcStatus, decode_status

EXPIRY_MARGIN_S = 5.0  # a copy launched just before expires_at lands well within this
DEAD_GRACE_S = 1.0  # a gone peer's context is torn down (its queued copies end) within this


@dataclass
class _Wait:
    """A grant made to a prefill peer, until its slot is set."""

    room: int
    peer: PeerId
    slot: int
    seq: int
    page_ids: list[int]
    expires_at: float
    instance: bytes | None = None  # which process of the peer got the grant, if known
    landed: IpcStatus | None = None  # slot set, status still to come by message
    status: m.RoomStatus | None = None  # status came by message, slot not set yet
    gone_since: float | None = None  # when its peer was first seen gone (forgotten waits)


class Landings:
    """Grants in flight on one decode worker. `reject(peer, reason)` counts garbage; `stats`
    (the transport's counters) gets `kv_bytes_in` and `ipc_grants_dropped` (slots prefill
    set with nothing in them: it will not write)."""

    def __init__(
        self,
        board: SlotBoard,
        page_nbytes: int,
        reject: Callable[[PeerId, str], int],
        stats: Counter[str],
    ):
        self.board = board
        self.page_nbytes = page_nbytes
        self._reject = reject
        self._stats = stats
        self._waits: dict[int, _Wait] = {}
        self._room_of_slot: dict[int, int] = {}
        self._announced: set[int] = set()  # rooms prefill said it queued, slot not set yet
        self._lingering: list[_Wait] = []  # forgotten rooms whose slot is not set yet

    def grant(self, page_list: m.PageList, ttl_s: float) -> IpcGrant:
        """A slot for the room's page list (SlotsFull if none is free); `commit` it once
        the grant is on its way, `cancel` it if it could not be sent."""
        slot, seq = self.board.take()
        expires_at = time.monotonic() + ttl_s
        return IpcGrant(page_list=page_list, slot=slot, seq=seq, expires_at=expires_at)

    def commit(self, peer: PeerId, grant: IpcGrant, instance: bytes | None = None) -> None:
        """`instance`: the peer process's instance id from its handshake, if it sent one."""
        room = grant.page_list.room
        pages = list(grant.page_list.dst_page_ids)
        wait = _Wait(room, peer, grant.slot, grant.seq, pages, grant.expires_at, instance)
        self._waits[room] = wait
        self._room_of_slot[grant.slot] = room

    def cancel(self, grant: IpcGrant) -> None:
        self.board.release(grant.slot)

    def announce(self, rooms: list[int]) -> None:
        self._announced.update(r for r in rooms if r in self._waits)

    def forget_announced(self, room: int) -> None:
        self._announced.discard(room)

    @property
    def copies_in_flight(self) -> bool:
        """Prefill said it queued copies whose slots are not set yet (they land soon)."""
        return bool(self._announced)

    @property
    def waiting(self) -> bool:
        """Grants whose slot is not set yet."""
        return bool(self._waits)

    def collect(self) -> list[Event]:
        """KVReceived + RoomStatus of every grant whose slot was set since the last call."""
        if not self._waits:
            return []
        events: list[Event] = []
        for slot in self.board.landed().tolist():
            room = self._room_of_slot.get(slot)
            wait = self._waits.get(room) if room is not None else None
            if wait is not None and wait.slot == slot and wait.landed is None:
                self._on_landed(wait, events)
        return events

    def await_announced(self, timeout_s: float) -> list[Event]:
        """Read the slots of copies prefill queued until one lands (at most timeout_s)."""
        deadline = time.perf_counter() + timeout_s
        events: list[Event] = []
        while not events and self._announced and time.perf_counter() < deadline:
            events = self.collect()
        return events

    def on_status(self, peer: PeerId, msg: m.RoomStatus) -> list[Event] | None:
        """A RoomStatus message: the status of a room too long for its slot (events once
        the slot is set too), or None if it is not one of ours (handle it as usual)."""
        wait = self._waits.get(msg.room)
        if wait is None or not msg.ok:
            return None
        if wait.peer != peer:
            self._reject(peer, "ipc_status_peer")
            return []
        if wait.landed is None:
            wait.status = msg
            return []
        events: list[Event] = []
        self._finish(wait)
        self._emit(wait, wait.landed.num_pages, msg, events)
        return events

    def forget(self, room: int) -> list[int]:
        """The room is over here: its pages are free now unless a write may still come
        (returned: kept out of use until a PagesSettled from `settle`)."""
        self._announced.discard(room)
        wait = self._waits.pop(room, None)
        if wait is None:
            return []
        self._room_of_slot.pop(wait.slot, None)
        if self.board.is_landed(wait.slot):
            self.board.release(wait.slot)
            return []
        self._lingering.append(wait)
        return list(wait.page_ids)

    def settle(self, peer_gone: Callable[[PeerId, bytes | None], bool]) -> list[Event]:
        """PagesSettled for forgotten rooms that no write can reach any more: their slot is
        set, their grant expired, or the peer process they were granted to is gone
        (`peer_gone(peer, instance)`: it exited, or another process took its place)."""
        if not self._lingering:
            return []
        now, events, still = time.monotonic(), [], []
        for wait in self._lingering:
            if self._write_may_come(wait, now, peer_gone):
                still.append(wait)
                continue
            self.board.release(wait.slot)
            if wait.page_ids:
                events.append(PagesSettled(wait.page_ids))
        self._lingering = still
        return events

    def _write_may_come(
        self, wait: _Wait, now: float, peer_gone: Callable[[PeerId, bytes | None], bool]
    ) -> bool:
        if self.board.is_landed(wait.slot) or now > wait.expires_at + EXPIRY_MARGIN_S:
            return False
        if not peer_gone(wait.peer, wait.instance):  # its process lives: the slot will be set
            return True
        if wait.gone_since is None:
            wait.gone_since = now
        return now - wait.gone_since < DEAD_GRACE_S

    def _on_landed(self, wait: _Wait, events: list[Event]) -> None:
        raw, landed = self.board.status_bytes(wait.slot), None
        if raw is not None:
            try:
                landed = decode_status(raw)
            except msgspec.MsgspecError:
                self._reject(wait.peer, "ipc_status")
        if landed is not None and landed.status is None and wait.status is None:
            wait.landed = landed  # the bytes are in; the status follows as a message
            return
        self._finish(wait)
        if landed is None:  # prefill dropped the grant, and its message says why
            self._stats["ipc_grants_dropped"] += 1
        else:
            self._emit(wait, landed.num_pages, landed.status or wait.status, events)

    def _emit(
        self, wait: _Wait, num_pages: int, status: m.RoomStatus | None, events: list[Event]
    ) -> None:
        if status is None or status.room != wait.room:
            self._reject(wait.peer, "ipc_status_room")
            return
        if status.ok:
            nbytes = num_pages * self.page_nbytes
            self._stats["kv_bytes_in"] += nbytes
            events.append(KVReceived(wait.peer, wait.room, num_pages, nbytes, len(wait.page_ids)))
        events.append(Inbound(wait.peer, status))

    def _finish(self, wait: _Wait) -> None:
        self._waits.pop(wait.room, None)
        self._announced.discard(wait.room)
        self._room_of_slot.pop(wait.slot, None)
        self.board.release(wait.slot)

    def close(self) -> None:
        self.board.close()
