"""Prefill worker side of disaggregation: compute the prompt, then ship its KV pages and
first token to the decode worker that asked for them. Runs inside each prefill worker.

Either the request (from the front end) or decode's page list (from the KV channel) may
come first; a room is sent once both are there and the engine has handed over its pages.
The room's state (`disagg.rooms`) drives every decision here; `disagg.prefill_gate` decides
when a request enters the engine (before its page list only while the pool has room).
"""

from __future__ import annotations

import logging
import time

from pdserve.auth import ProofChecker
from pdserve.disagg import kv_auth, prefill_room
from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_peers import DecodePeers
from pdserve.disagg.delta import pages_to_send, prompt_digest
from pdserve.disagg.prefill_gate import PrefillGate
from pdserve.disagg.prefill_room import WAITING_FOR_ONE_SIDE, FailedRoom, PrefillRoom
from pdserve.disagg.room_relay import ForwardTable
from pdserve.disagg.rooms import IllegalRoomTransition, RoomState, error_output
from pdserve.disagg.stall import StallClock
from pdserve.disagg.transfer.base import Inbound, KVTransport, PagesSettled, PeerLost
from pdserve.engine.page_pool import pages_for
from pdserve.engine.request import FinishReason, StepOutput
from pdserve.serving.hooks import DECODE_ORIGIN, WorkerHooks
from pdserve.serving.protocol import GenerateReq, ReqOutput, RoomFailed, RoomForwarded
from pdserve.serving.worker_io import output_to_msg, request_from_msg, without_finish

log = logging.getLogger(__name__)

DEADLINES_EVERY_S = 0.01


class PrefillWorkerHooks(WorkerHooks):
    def __init__(
        self, engine, cfg: DisaggConfig, transport: KVTransport, dp_rank: int, epoch: int = 0
    ):
        super().__init__(engine)
        self.cfg = cfg
        self.transport = transport
        self.dp_rank, self.epoch = dp_rank, epoch
        self.decode_peers = DecodePeers()  # the handshaken connections, decode epochs
        self.layout = engine.kv_layout()
        self.rooms: dict[int, PrefillRoom] = {}
        self.sending: dict[int, PrefillRoom] = {}  # rooms TRANSFERRING
        self._next_deadlines = 0.0  # rooms' deadlines are looked at every DEADLINES_EVERY_S
        self.room_of_rid: dict[str, int] = {}
        self.failed: dict[int, FailedRoom] = {}  # answers for late page lists
        self.checker = ProofChecker(cfg.disagg_secret) if cfg.disagg_secret else None
        self.forwards = ForwardTable(cfg.bootstrap_timeout_s)  # rooms of ours served elsewhere
        self._unclaimed: list[int] = []  # for the front end, until unclaimed_rooms()
        max_request_pages = pages_for(engine.max_context_len, engine.page_size)
        self.gate = PrefillGate(engine.num_total_pages, max_request_pages)
        self.stall = StallClock(cfg.heartbeat_timeout_s, DECODE_ORIGIN)

    @property
    def kv_endpoint(self) -> str | None:
        return self.transport.endpoint

    def num_rooms(self) -> int:
        return len(self.rooms)

    def num_parked(self) -> int:
        return self.gate.num_parked

    def num_parked_tokens(self) -> int:
        if not self.gate.num_parked:  # the common case, every turn of the worker loop
            return 0
        return sum(r.prompt_len for r in self.rooms.values() if r.parked is not None)

    def num_auth_refusals(self) -> int:
        return sum(self.checker.refused.values()) if self.checker is not None else 0

    def unclaimed_rooms(self) -> list[int]:
        rooms, self._unclaimed = self._unclaimed, []
        return rooms

    def sockets(self) -> list:
        return self.transport.sockets()

    def busy(self) -> bool:
        return self.transport.busy() or bool(self.sending)

    # -- front end -> worker ---------------------------------------------------------
    def on_generate(self, msg: GenerateReq, now: float | None = None) -> list[ReqOutput]:
        now = _now() if now is None else now
        room_id = msg.disagg.room if msg.disagg else None
        if room_id is None:
            return [error_output(msg.rid, 400, "prefill request without bootstrap_room")]
        failed = self.failed.get(room_id)
        if failed is not None:  # the room failed on its way here (e.g. decode gave up)
            return [error_output(msg.rid, failed.status, failed.reason, failed.origin)]
        room = self.rooms.get(room_id)
        if room is not None and room.state is not RoomState.WAITING_FOR_REQUEST:
            # The front end lets one request per room through (serving.generation).
            raise IllegalRoomTransition(
                f"room {room_id}: a second request while {room.state.value}"
            )
        req = request_from_msg(msg)
        if req.sampling.max_new_tokens == 0:
            # Nothing to decode (prompt logprobs only): answered here, no KV moves, and the
            # decode leg answers at once too.
            self.engine.add_request(req)
            return []
        req.prefill_only = True
        try:  # at once, though the request may enter the engine only later (poll)
            self.engine.check_admissible(req)
        except ValueError as exc:  # RequestRejected: the request can never run here
            self._fail_room(room_id, 400, str(exc), now)
            return [error_output(msg.rid, 400, str(exc))]
        if room is None:
            room = PrefillRoom(room_id, RoomState.BOOTSTRAPPING, now + self.cfg.bootstrap_timeout_s)
            self.rooms[room_id] = room
        else:
            room.move(RoomState.WAITING_FOR_INPUT)
        room.rid, room.prompt_len = req.rid, len(req.prompt_ids)
        room.prompt_digest = prompt_digest(req.prompt_ids)
        room.arrived_at, room.parked = now, req
        self.room_of_rid[req.rid] = room_id
        num_pages = pages_for(room.prompt_len, self.layout.page_size)
        self.gate.park(room_id, num_pages, listed=room.dst_page_ids is not None)
        return []

    def on_abort(self, rid: str, reason: str) -> list[ReqOutput]:
        """Ends the room before the engine sees the abort (pages its send may still read stay
        out of use, which the engine's abort alone would free) and answers it."""
        room_id = self.room_of_rid.get(rid)
        if room_id is None:
            return []
        handle = self.sending[room_id].send_handle if room_id in self.sending else None
        if handle is not None and handle.done() and not getattr(handle, "error", None):
            return self._finish_sent(_now())  # its KV is in decode's pool: sent, and counted
        out = self._end_room(room_id, 499, f"aborted on prefill: {reason}", _now(), reason)
        return [output_to_msg(out)] if out is not None else []

    def on_room_failed(self, msg: RoomFailed) -> list[ReqOutput]:
        self.forwards.pop(msg.room)
        return self._fail_room(msg.room, msg.status, msg.reason, _now(), origin=msg.origin)

    def on_room_forwarded(self, msg: RoomForwarded) -> list[ReqOutput]:
        """A room whose home we are was dispatched to another worker. Decode's page list may
        be here already (redirected now) or come later (redirected when it comes)."""
        room = self.rooms.get(msg.room)
        if room is None:
            leased_by = self.forwards.add(msg.room, msg.dp_rank, msg.kv_endpoint, _now())
            if leased_by is not None:
                self._send(leased_by, _redirect(msg.room, msg.dp_rank, msg.kv_endpoint))
        elif room.state is RoomState.WAITING_FOR_REQUEST:
            # The room leaves this worker: it holds no pages here, the request never comes.
            self._send(room.peer, _redirect(msg.room, msg.dp_rank, msg.kv_endpoint))
            self._forget(msg.room)
        else:  # the front end lets one request per room through, and it went elsewhere
            args = (msg.room, msg.dp_rank, room.state.value)
            log.warning("room %d forwarded to dp rank %d while %s here: ignored", *args)
        return []

    # -- the loop ------------------------------------------------------------------
    def poll(self, now: float) -> list[ReqOutput]:
        self.stall.turn(now)
        outputs = self._on_events(self.transport.poll(0), now)
        outputs += self._finish_sent(now)
        outputs += self._deadlines(now)
        outputs += self._release_parked(now)
        if self.engine.has_work():
            outputs += self._finish_sends_first(now)
        return outputs

    def _release_parked(self, now: float) -> list[ReqOutput]:
        """Hands the engine the parked requests the gate lets go now."""
        outputs: list[ReqOutput] = []
        for room_id in self.gate.release():
            room = self.rooms[room_id]
            req, room.parked = room.parked, None
            try:
                self.engine.add_request(req)
            except ValueError as exc:  # checked on arrival: only a bug gets here
                outputs += self._fail_room(room_id, 400, str(exc), now)
        return outputs

    def _finish_sends_first(self, now: float) -> list[ReqOutput]:
        """Drive KV sends under way to their end before the next forward pass: the bytes the
        socket did not take would otherwise wait for all of it (a later prompt's prefill),
        adding that to this request's TTFT where a colocated server adds nothing. Bounded by
        kv_send_wait_s: a decode slow to read delays the next prefill by at most that. Sends
        that only wait for the peer (a NIXL read that decode drives) do not hold it up."""
        outputs: list[ReqOutput] = []
        deadline = now + self.cfg.kv_send_wait_s
        while self.transport.busy() and self.sending:
            left_ms = int((deadline - _now()) * 1000)
            if left_ms <= 0:
                break
            events = self.transport.poll(min(left_ms, 50))
            now = _now()
            outputs += self._on_events(events, now) + self._finish_sent(now)
        return outputs

    def _on_events(self, events: list, now: float) -> list[ReqOutput]:
        outputs: list[ReqOutput] = []
        for event in events:
            try:
                if isinstance(event, Inbound):
                    outputs += self._on_message(event.peer, event.msg, now)
                elif isinstance(event, PeerLost):
                    outputs += self._on_peer_lost(event, now)
                elif isinstance(event, PagesSettled):  # a forgotten room's send let go
                    self.engine.release_pages(event.page_ids)
            except Exception:  # a bug here must fail rooms by deadline, not the worker
                log.exception("prefill: error handling %r", event)
        return outputs

    def after_step(
        self, now: float, outputs: list[ReqOutput], held_pages: dict[str, list[int]]
    ) -> list[ReqOutput]:
        # The first token is forwarded now; the request's finish follows once KV is sent
        # (or its failure, which may come from this very call).
        forwarded = [without_finish(o) if o.rid in self.room_of_rid else o for o in outputs]
        failures: list[ReqOutput] = []
        for out in outputs:
            page_ids = held_pages.get(out.rid)
            if page_ids is None:
                continue
            room_id = self.room_of_rid.get(out.rid)
            if room_id is None:  # no room to send them to: never hold pages for nobody
                log.warning("prefill: request %s holds pages but has no room", out.rid)
                self.engine.abort(out.rid, "no bootstrap room for its KV")
                continue
            room = self.rooms[room_id]
            room.src_page_ids = page_ids
            room.first = m.FirstToken(
                room=room_id,
                token_id=out.new_token_ids[0],
                logprob=out.new_token_logprobs[0] if out.new_token_logprobs else None,
                top_logprobs=out.new_top_logprobs[0] if out.new_top_logprobs else None,
                cached_tokens=out.cached_tokens,
            )
            room.computed_at = now
            failures += self._maybe_send(room, now)
        return forwarded + failures

    def _on_message(self, peer: object, msg: m.ChannelMsg, now: float) -> list[ReqOutput]:
        if isinstance(msg, m.Handshake):
            return self._on_handshake(peer, msg, now)
        elif isinstance(msg, m.PageList):
            return self._on_page_list(peer, msg, now)
        elif isinstance(msg, m.RoomsQueued):
            return self._on_queued(peer, msg, now)
        elif isinstance(msg, m.Abort):
            room = self.rooms.get(msg.room)
            if room is not None and room.peer == peer:
                return self._fail_room(
                    msg.room, 499, f"aborted by decode: {msg.reason}", now, notify=False
                )
        return []

    def _on_handshake(self, peer: object, msg: m.Handshake, now: float) -> list[ReqOutput]:
        error = kv_auth.check(self.checker, msg, time.time(), self.transport.endpoint)
        if error is not None:
            log.warning("prefill: refused the KV handshake of %s: %s", msg.decode_id, error)
        else:
            error = msg.mismatch(self.transport.name, self.layout)
            error = error or self.transport.accept_peer_meta(peer, msg.transfer_meta)
        outputs = [] if error is not None else self._on_decode_epoch(peer, msg, now)
        if error is not None:
            self.decode_peers.refuse(peer)
        meta = self.transport.handshake_meta() if error is None else b""
        result = m.HandshakeResult(
            ok=error is None, error=error, epoch=self.epoch, transfer_meta=meta
        )
        self._send(peer, kv_auth.answer(self.checker, msg, result))
        return outputs

    def _on_decode_epoch(self, peer: object, msg: m.Handshake, now: float) -> list[ReqOutput]:
        """A decode server that handshakes with a new epoch restarted: the rooms of its old
        epoch will never be read; fail them, free their pages, forget the old connections."""
        old = self.decode_peers.epoch(msg.decode_id)
        stale = self.decode_peers.accept(peer, msg.decode_id, msg.epoch)
        if old is None or old == msg.epoch:
            return []
        log.warning("decode %s restarted: epoch %d -> %d", msg.decode_id, old, msg.epoch)
        reason = f"decode server {msg.decode_id} restarted (new epoch) before reading the KV"
        lost = [r.room for r in self.rooms.values() if r.peer in stale]  # decode's doing
        return self._fail_for_decode(lost, 503, reason, now, DECODE_ORIGIN)

    def _on_peer_lost(self, event: PeerLost, now: float) -> list[ReqOutput]:
        self.decode_peers.lost(event.peer)
        reason, origin = self.stall.attribute(f"lost the connection to decode: {event.reason}", now)
        lost = [r.room for r in self.rooms.values() if r.peer == event.peer]
        return self._fail_for_decode(lost, 503, reason, now, origin)

    def _on_page_list(self, peer: object, msg: m.PageList, now: float) -> list[ReqOutput]:
        if peer not in self.decode_peers and msg.room not in self.failed:
            error = "page list before handshake"
            status = m.RoomStatus(room=msg.room, ok=False, error=error, handshake_needed=True)
            self._send(peer, status)
            return []
        if self._answered_elsewhere(peer, msg.room):
            return []
        room = self.rooms.get(msg.room)
        if room is None:
            room = PrefillRoom(
                msg.room, RoomState.WAITING_FOR_REQUEST, now + self.cfg.bootstrap_timeout_s
            )
            self.rooms[msg.room] = room
        elif room.state is RoomState.BOOTSTRAPPING:
            room.move(RoomState.WAITING_FOR_INPUT)
        else:  # this room's page list came already: the room stays as it is
            self._send(peer, m.RoomStatus(room=msg.room, ok=False, error="duplicate page list"))
            return []
        room.peer, room.dst_page_ids, room.dst_prompt_len = peer, msg.dst_page_ids, msg.prompt_len
        room.num_cached_tokens = msg.num_cached_tokens
        room.dst_prompt_digest = msg.prompt_digest
        self.gate.on_listed(msg.room)
        return self._maybe_send(room, now)

    def _on_queued(self, peer: object, msg: m.RoomsQueued, now: float) -> list[ReqOutput]:
        """A lease: decode queues these rooms for its own capacity. A request here waiting
        for one's page list keeps waiting a bootstrap deadline from now; a room that failed
        or went to another worker is answered as its page list would be."""
        if peer not in self.decode_peers:
            return []
        for room_id in msg.rooms:
            room = self.rooms.get(room_id)
            if self._answered_elsewhere(peer, room_id, lease=True):
                continue
            if room is None:  # its request, or the notice that it went elsewhere, may follow
                self.forwards.note_lease(room_id, peer, now)
            elif room.state is RoomState.BOOTSTRAPPING:
                room.deadline = max(room.deadline, now + self.cfg.bootstrap_timeout_s)
        return []

    def _answered_elsewhere(self, peer: object, room_id: int, lease: bool = False) -> bool:
        """Answers decode for a room that failed here (its failure) or that the front end
        dispatched to another worker (a Redirect there; a lease keeps the entry: the room's
        page list may be on its way here already); False for any other room."""
        failed = self.failed.get(room_id)
        if failed is not None:
            self._send(peer, failed.answer(room_id))
            return True
        target = self.forwards.get(room_id) if lease else self.forwards.pop(room_id)
        if target is not None:
            self._send(peer, _redirect(room_id, target.dp_rank, target.kv_endpoint))
        return target is not None

    def _maybe_send(self, room: PrefillRoom, now: float) -> list[ReqOutput]:
        """Starts the send once the room has both sides and the engine's pages."""
        if room.state is not RoomState.WAITING_FOR_INPUT or room.src_page_ids is None:
            return []
        reason = room.send_error(self.layout.page_size)
        if reason is not None:
            return self._fail_room(room.room, 500, reason, now)
        src_page_ids = pages_to_send(
            room.src_page_ids, room.num_cached_tokens, self.layout.page_size
        )
        room.move(RoomState.TRANSFERRING)
        self.sending[room.room] = room
        status = m.RoomStatus(room=room.room, ok=True, first=room.first)
        room.send_started_at = now
        try:
            room.send_handle = self.transport.send_kv(
                room.peer, room.room, src_page_ids, list(room.dst_page_ids), status
            )
        except Exception as exc:  # the decode peer vanished
            reason, origin = self.stall.attribute(f"sending KV to decode failed: {exc}", now)
            return self._fail_for_decode([room.room], 503, reason, now, origin)
        return []

    def _finish_sent(self, now: float) -> list[ReqOutput]:
        outputs: list[ReqOutput] = []
        for room in list(self.sending.values()):
            if not room.send_handle.done():
                continue
            error = getattr(room.send_handle, "error", None)
            if error:
                outputs += self._fail_room(
                    room.room, 503, f"sending KV failed: {error}", _now(), notify=False
                )
                continue
            num_pages = len(room.dst_page_ids)
            sent_nothing = self.transport.name == "fake"  # control messages only, as decode counts
            room.move(RoomState.SUCCESS)
            self.engine.release(room.rid)
            self._forget(room.room)
            kv_bytes = 0 if sent_nothing else num_pages * self.transport.page_nbytes
            outputs.append(room.sent_output(now, kv_bytes))
        return outputs

    def _deadlines(self, now: float) -> list[ReqOutput]:
        if now < self._next_deadlines:
            return []
        self._next_deadlines = now + DEADLINES_EVERY_S
        outputs: list[ReqOutput] = []
        # Once both sides are here, decode's KV deadline and heartbeat govern; a vanished
        # decode shows up as PeerLost or PeerUnreachable when the KV is sent.
        waiting = [r for r in self.rooms.values() if r.state in WAITING_FOR_ONE_SIDE]
        timeout_s = self.cfg.bootstrap_timeout_s
        self._unclaimed += prefill_room.newly_unclaimed(waiting, now, timeout_s)
        for lapse in prefill_room.lapsed(waiting, now, self.dp_rank, timeout_s):
            origin, reason = None, lapse.reason
            if lapse.for_decode:
                reason, origin = self.stall.attribute(reason, now)
            outputs += self._fail_room(lapse.room, 504, reason, now, origin=origin)
        for room_id in [r for r, f in self.failed.items() if now >= f.expires_at]:
            del self.failed[room_id]
        self.forwards.expire(now)
        return outputs

    def _fail_room(
        self,
        room_id: int,
        status: int,
        reason: str,
        now: float,
        notify: bool = True,
        origin: str | None = None,
    ) -> list[ReqOutput]:
        """Fail the room (see `_end_room`) and answer its request with the error."""
        room = self.rooms.get(room_id)
        rid = room.rid if room is not None else None
        self._end_room(room_id, status, reason, now, notify=notify, origin=origin)
        return [error_output(rid, status, reason, origin)] if rid is not None else []

    def _fail_for_decode(
        self, room_ids: list[int], status: int, reason: str, now: float, origin: str | None
    ) -> list[ReqOutput]:
        """Fail rooms their decode peer failed (lost, restarted, unreachable): no one to
        tell now; `origin` (whose fault) on our error and on the answer to a late page list."""
        fail = self._fail_room
        return [o for r in room_ids for o in fail(r, status, reason, now, False, origin)]

    def _end_room(
        self,
        room_id: int,
        status: int,
        reason: str,
        now: float,
        engine_reason: str | None = None,
        notify: bool = True,
        origin: str | None = None,
    ) -> StepOutput | None:
        """Fail the room: tell decode (now or when its page list comes; `origin`
        DECODE_ORIGIN when decode's fault), drop what of its send has not started, and abort
        its request; pages a send under way still reads stay unchanged and out of use until
        the transport reports them settled. Returns the request's abort output (None: no
        request)."""
        expires_at = now + self.cfg.bootstrap_timeout_s
        self.failed[room_id] = FailedRoom(reason, status, expires_at, origin)
        room = self.rooms.get(room_id)
        if room is None:
            return None
        room.move(RoomState.FAILED)
        if notify and room.peer is not None:
            self._send(room.peer, prefill_room.failed_status(room_id, reason, status, origin))
        still_read = self._forget(room_id)
        if room.rid is None:
            return None
        if room.parked is not None:  # never handed to the engine
            message = engine_reason or reason
            return StepOutput(room.rid, finish_reason=FinishReason("abort", message=message))
        return self.engine.abort(room.rid, engine_reason or reason, keep_page_ids=still_read)

    def _forget(self, room_id: int) -> list[int]:
        """Forget the room here and in the transport; returns the pages its send still reads."""
        still_read = self.transport.forget_room(room_id)
        self.gate.drop(room_id)
        room = self.rooms.pop(room_id, None)
        self.sending.pop(room_id, None)
        if room is not None and room.rid is not None:
            self.room_of_rid.pop(room.rid, None)
        return still_read

    def _send(self, peer: object, msg: m.ChannelMsg) -> None:
        try:
            self.transport.send(peer, msg)
        except Exception as exc:  # the peer vanished: its rooms fail by deadline or on use
            log.warning("send to decode peer failed: %s", exc)

    def close(self) -> None:
        self.transport.close()


def _redirect(room: int, dp_rank: int, kv_endpoint: str) -> m.Redirect:
    return m.Redirect(room=room, dp_rank=dp_rank, kv_endpoint=kv_endpoint)


def _now() -> float:
    return time.monotonic()
