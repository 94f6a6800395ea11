"""Decode worker side of disaggregation: reserve pages, ask the prefill worker for the KV,
admit the request once it arrives; in each decode worker process's loop. Every room has a
deadline in every state, and the transport reports a prefill worker whose connection died
(ZeroMQ heartbeats), so a room reaches the engine or fails with a reason and frees its pages."""

from __future__ import annotations

import logging
import time

import msgspec

from pdserve.disagg import kv_auth
from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_room import (
    AdmissionQueue,
    DecodeRoom,
    Peer,
    engine_admits_first,
    shared_prefix_arriving,
)
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.rooms import IllegalRoomTransition, RoomState, error_output
from pdserve.disagg.stall import StallClock
from pdserve.disagg.transfer.base import (
    Event,
    KVReceived,
    KVTransport,
    PagesSettled,
    PeerLost,
    PeerUnreachable,
)
from pdserve.engine.request import FinishReason, StepOutput
from pdserve.serving.hooks import DECODE_ORIGIN, WorkerHooks
from pdserve.serving.hooks import PREFILL_ORIGIN as PREFILL
from pdserve.serving.protocol import GenerateReq, ReqOutput
from pdserve.serving.worker_io import output_to_msg, request_from_msg

log = logging.getLogger(__name__)


class DecodeWorkerHooks(WorkerHooks):
    def __init__(
        self, engine, cfg: DisaggConfig, transport: KVTransport, decode_id: str, epoch: int = 0
    ):
        super().__init__(engine)
        self.cfg = cfg
        self.transport = transport
        self.decode_id, self.epoch = decode_id, epoch
        self.stale_epoch_refusals = 0  # KV records or statuses from a replaced prefill epoch
        self.layout = engine.kv_layout()
        self.rooms: dict[int, DecodeRoom] = {}
        self.room_of_rid: dict[str, int] = {}
        self.queue = AdmissionQueue(cfg.bootstrap_timeout_s / 4)
        self.reserved: dict[int, DecodeRoom] = {}  # rooms whose page list went out
        self._parked_tokens = 0  # prompt tokens of the rooms not reserved yet
        self.peers: dict[str, Peer] = {}
        self.peer_by_id: dict[object, Peer] = {}
        self._lost_endpoints: list[str] = []  # for the front end, until lost_kv_peers()
        self.stall = StallClock(cfg.heartbeat_timeout_s, PREFILL)

    def num_rooms(self) -> int:
        return len(self.rooms)

    def num_kv_peers(self) -> int:
        return len(self.peers)

    def num_parked(self) -> int:
        """Rooms not in the engine yet (handshake, admission queue): waiting, to a router."""
        return len(self.rooms) - len(self.reserved)

    def num_parked_tokens(self) -> int:
        return self._parked_tokens

    def lost_kv_peers(self) -> list[str]:
        lost, self._lost_endpoints = self._lost_endpoints, []
        return lost

    def sockets(self) -> list:
        return self.transport.sockets()

    def busy(self) -> bool:
        return self.transport.busy()

    # -- front end -> worker ---------------------------------------------------------
    def on_generate(self, msg: GenerateReq, now: float | None = None) -> list[ReqOutput]:
        info = msg.disagg
        now = _now() if now is None else now
        req = request_from_msg(msg)
        req.arrived_at = now  # the order in which rooms and the engine's requests are admitted
        if info is None:
            # Local prefill (the front end lets a request without a room through only when
            # it asked for that): computed here, past what this worker's cache holds.
            self.engine.add_request(req)
            return []
        if msg.sampling.max_new_tokens == 0:  # nothing to generate: prefill sends no KV
            # Refused as a colocated server with this pool would (RequestRejected: a 400).
            self.engine.check_admissible(req)
            return [ReqOutput(rid=msg.rid, finish_reason=FinishReason("length"))]
        if info.prefill_endpoint is None:
            return [
                error_output(msg.rid, 500, "decode request without a resolved prefill endpoint")
            ]
        if info.room in self.rooms:
            # The front end lets one request per room through (serving.generation).
            raise IllegalRoomTransition(f"room {info.room}: a second request")
        try:  # before the room is recorded: a refused endpoint leaves nothing behind
            peer = self._peer(info.prefill_endpoint, now)
        except ValueError as exc:  # what the prefill server registered, not our fault
            reason = f"prefill dp rank {info.prefill_dp_rank}: {exc}"
            return [error_output(msg.rid, 502, reason, PREFILL)]
        room = DecodeRoom(
            info.room,
            req,
            info.prefill_endpoint,
            info.prefill_dp_rank,
            deadline=now + self.cfg.bootstrap_timeout_s,
            arrived_at=now,
        )
        self.rooms[info.room] = room
        self.room_of_rid[req.rid] = info.room
        self._parked_tokens += len(req.prompt_ids)
        peer.rooms.add(info.room)
        return self._progress(room, now)

    def on_abort(self, rid: str, reason: str) -> list[ReqOutput]:
        """Ends the room before the engine sees the abort (pages a transfer may still write
        stay out of use) and answers it: a room holding no pages yet has no request in the
        engine, whose abort would answer nothing."""
        room_id = self.room_of_rid.get(rid)
        if room_id is None:
            return []
        out = self._end(self.rooms[room_id], reason)
        if out is None:
            out = StepOutput(rid, finish_reason=FinishReason("abort", message=reason))
        return [output_to_msg(out)]

    # -- the loop ------------------------------------------------------------------
    def poll(self, now: float) -> list[ReqOutput]:
        self.stall.turn(now)
        outputs: list[ReqOutput] = []
        for event in self.transport.poll(0):
            try:
                outputs += self._on_event(event, now)
            except Exception:  # a bug here must fail rooms by deadline, not the worker
                log.exception("decode: error handling %r", event)
        outputs += self._admit(now)  # pages or a request slot may have been freed meanwhile
        for endpoint, rooms in self.queue.leases_due(now).items():
            self._send(self.peers[endpoint], m.RoomsQueued(rooms=rooms))
        outputs += self._deadlines(now)
        for peer in [p for p in self.peers.values() if p.unused_since_lost(now)]:
            del self.peers[peer.endpoint], self.peer_by_id[peer.peer_id]
            self.transport.disconnect(peer.peer_id)  # else dialed every 100 ms for good
        return outputs

    def _on_event(self, event: Event, now: float) -> list[ReqOutput]:
        if isinstance(event, PagesSettled):
            self.engine.release_pages(event.page_ids)
            return []
        peer = self.peer_by_id.get(event.peer)
        if peer is None:
            return []
        if isinstance(event, PeerLost):
            if peer.handshake_sent:  # once per loss: ZeroMQ reports each failed reconnect
                self._lost_endpoints.append(peer.endpoint)
            # A restarted prefill worker knows nothing of us: handshake again next time.
            peer.handshake_ok, peer.handshake_sent = None, False
            peer.lost_at = now if peer.lost_at is None else peer.lost_at
            reason = f"lost the connection to prefill worker {peer.endpoint}: {event.reason}"
            reason, origin = self.stall.attribute(reason, now)
            return [out for r in sorted(peer.rooms) for out in self._fail(r, 503, reason, origin)]
        if isinstance(event, KVReceived):
            return self._on_kv(peer, event)
        msg = event.msg
        if isinstance(msg, m.HandshakeResult):
            return self._on_handshake(peer, msg, now)
        if isinstance(msg, m.RoomStatus):
            return self._on_status(peer, msg, now)
        if isinstance(msg, m.Redirect):
            return self._on_redirect(peer, msg, now)
        if isinstance(msg, m.Abort) and msg.room in peer.rooms:
            reason = f"prefill aborted room {msg.room}: {msg.reason}"
            return self._fail(msg.room, 500, reason, PREFILL)
        return []

    def _on_handshake(self, peer: Peer, msg: m.HandshakeResult, now: float) -> list[ReqOutput]:
        distrust = kv_auth.check_answer(self.cfg.disagg_secret, peer.handshake, msg)
        if msg.ok and distrust is None:
            distrust = self.transport.accept_peer_meta(peer.peer_id, msg.transfer_meta)
        peer.handshake_ok = msg.ok and distrust is None
        peer.handshake_error = msg.error or distrust
        if distrust is not None:
            log.warning("decode: KV handshake with %s refused: %s", peer.endpoint, distrust)
        outputs = [] if distrust is not None else self._on_epoch(peer, msg.epoch)
        for room_id in sorted(peer.rooms):
            room = self.rooms.get(room_id)
            if room is not None:
                outputs += self._progress(room, now)
        return outputs

    def _on_redirect(self, peer: Peer, msg: m.Redirect, now: float) -> list[ReqOutput]:
        """The room's home worker does not hold its KV: the prefill server dispatched it to
        another worker, which gets our page list now (after a handshake, if it is new to us).
        The KV deadline set when the first page list went out still governs."""
        room = self.rooms.get(msg.room)
        if room is None or msg.room not in peer.rooms:
            return []  # late: the room failed or was aborted here meanwhile
        if msg.room in self.queue:
            # Answering a lease: the room is leased, and later listed, there instead.
            return self._move_queued(room, peer, msg, now)
        if room.state is not RoomState.WAITING_FOR_INPUT or room.redirected_at is not None:
            reason = f"unexpected redirect of room {msg.room} while {room.state.value}"
            return self._fail(msg.room, 500, reason, PREFILL)
        self.transport.forget_room(room.room)  # the home worker may no longer write our pages
        peer.rooms.discard(room.room)
        room.endpoint, room.prefill_dp_rank = msg.kv_endpoint, msg.dp_rank
        room.redirected_at, room.page_list_pending = now, True
        try:
            target = self._peer(msg.kv_endpoint, now)
        except ValueError as exc:
            return self._fail(msg.room, 502, f"bad redirect for room {msg.room}: {exc}", PREFILL)
        target.rooms.add(room.room)
        return self._progress(room, now)

    def _move_queued(
        self, room: DecodeRoom, peer: Peer, msg: m.Redirect, now: float
    ) -> list[ReqOutput]:
        peer.rooms.discard(room.room)
        room.endpoint, room.prefill_dp_rank = msg.kv_endpoint, msg.dp_rank
        room.redirected_at = now  # relayed before its page list: 0 s of relay
        room.leased_at = float("-inf")  # tell that worker at once: its deadline runs
        try:
            target = self._peer(msg.kv_endpoint, now)
        except ValueError as exc:
            return self._fail(msg.room, 502, f"bad redirect for room {msg.room}: {exc}", PREFILL)
        target.rooms.add(room.room)
        if not target.handshake_ok:  # queued still, but that handshake has a deadline
            room.deadline = now + self.cfg.bootstrap_timeout_s
        return []

    def _on_epoch(self, peer: Peer, epoch: int) -> list[ReqOutput]:
        """A new epoch: the prefill server restarted. Rooms whose page list went to the old
        one can never get their KV: fail them (their pages are freed) with the reason."""
        old, peer.epoch = peer.epoch, epoch
        if old is None or old == epoch:
            return []
        log.warning("prefill %s restarted: epoch %d -> %d", peer.endpoint, old, epoch)
        reason = f"prefill server at {peer.endpoint} restarted (new epoch) before sending the KV"
        bound = [r for r in sorted(peer.rooms) if self.rooms[r].epoch not in (None, epoch)]
        return [out for room in bound for out in self._fail(room, 503, reason, PREFILL)]

    def _stale(self, peer: Peer, room: DecodeRoom) -> bool:
        """Whether a record for `room` comes from an epoch other than its page list's."""
        if room.epoch is None or room.epoch == peer.epoch:
            return False
        self.stale_epoch_refusals += 1
        log.warning("refused a record of room %d from a stale prefill epoch", room.room)
        return True

    def _on_kv(self, peer: Peer, event: KVReceived) -> list[ReqOutput]:
        """The KV of a room is in its pages; its status comes next."""
        room = self.rooms.get(event.room)
        if room is None or event.room not in peer.rooms:
            return []  # late: the room failed or was aborted here meanwhile
        if self._stale(peer, room):
            reason = f"KV of room {room.room} from a stale prefill epoch"
            return self._fail(room.room, 503, reason, PREFILL)
        if room.state is not RoomState.WAITING_FOR_INPUT:  # no page list out, or KV twice
            return self._fail(
                room.room, 500, f"KV for room {room.room} arrived while {room.state.value}"
            )
        room.move(RoomState.TRANSFERRING)
        room.kv_pages = event.num_pages
        room.kv_bytes += event.nbytes
        return []

    def _on_status(self, peer: Peer, msg: m.RoomStatus, now: float) -> list[ReqOutput]:
        room = self.rooms.get(msg.room)
        if room is None or msg.room not in peer.rooms:
            return []  # late status for a room already failed or aborted here
        if self._stale(peer, room):
            reason = f"status of room {msg.room} from a stale prefill epoch"
            return self._fail(msg.room, 503, reason, PREFILL)
        if msg.handshake_needed and room.state is RoomState.WAITING_FOR_INPUT:
            peer.handshake_refused_later()  # failing the room alone failed every later one
            room.page_list_pending = True  # sent again once a new handshake is accepted
            self._peer(room.endpoint, now)
            return []
        if not msg.ok:  # prefill failed the room: its fault, unless it says it is ours
            reason = msg.error or "prefill failed the room"
            origin = None if msg.error_origin == DECODE_ORIGIN else PREFILL
            return self._fail(msg.room, msg.error_status, reason, origin)
        if room.state is not RoomState.TRANSFERRING:  # the transport reports KV before status
            return self._fail(
                msg.room, 500, f"KV status for room {msg.room} while {room.state.value}"
            )
        first = msg.first
        if first is None or first.room != msg.room:
            return self._fail(
                msg.room, 500, f"corrupt KV status for room {msg.room}: room check failed"
            )
        expected = len(room.dst_page_ids)
        if self.transport.name != "fake" and room.kv_pages != expected:
            return self._fail(
                msg.room,
                500,
                f"incomplete KV for room {msg.room}: {room.kv_pages} of {expected} pages arrived",
            )
        room.move(RoomState.SUCCESS)
        self._forget(msg.room)
        # The client's cached_tokens are the prompt tokens prefill did not compute; the ones
        # decode held already (not transferred) are reported as decode_cached_tokens.
        room.req.cached_tokens = first.cached_tokens
        try:
            steps = self.engine.admit_prefilled(
                room.req.rid, first.token_id, first.logprob, first.top_logprobs
            )
        except ValueError as exc:  # the request left the engine meanwhile
            log.warning("room %d not admitted: %s", msg.room, exc)
            return []
        outputs = [output_to_msg(s) for s in steps]
        if outputs:
            outputs[0] = msgspec.structs.replace(outputs[0], **room.first_output_stats(now))
        return outputs

    # -- progress of one room --------------------------------------------------------
    def _progress(self, room: DecodeRoom, now: float) -> list[ReqOutput]:
        """After the handshake: a room joins the admission queue (`_admit` reserves its
        pages), or sends the page list a redirect left pending."""
        peer = self.peers[room.endpoint]
        if peer.handshake_ok is False:
            reason = f"KV handshake with prefill {room.endpoint} failed: {peer.handshake_error}"
            return self._fail(room.room, 500, reason)
        if room.page_list_pending and peer.handshake_ok:
            room.page_list_pending = False
            return self._send_page_list(room, peer)
        if room.state is RoomState.BOOTSTRAPPING and peer.handshake_ok:
            self.queue.add(room)
        return []

    def _admit(self, now: float) -> list[ReqOutput]:
        """Reserve pages for queued rooms, oldest first, while they fit: the first that does
        not (no request slot or free pages) holds back the rest and the engine's later
        waiting requests, as colocated requests queue; an engine's waiting request that came
        first holds back the rooms. A room waiting for a shared prefix to land, or for the
        handshake with the worker a redirect named, steps aside meanwhile."""
        outputs: list[ReqOutput] = []
        blocked = False
        for room in self.queue.in_order() if self.queue else ():
            if engine_admits_first(self.engine.oldest_waiting(), room):
                break  # its next step does: arrival order across both queues
            peer = self.peers[room.endpoint]
            if room.room not in self.queue or not peer.handshake_ok:
                continue
            if self._share_pending(room, now):
                continue  # pages it shares are arriving for another room: reserve once cached
            try:
                # The cached prefix of the prompt is pinned; only the pages past it are new.
                dst_page_ids = self.engine.reserve(room.req, use_cache=True)
            except ValueError as exc:  # RequestRejected: it can never fit this decode server
                outputs += self._fail(room.room, 400, str(exc))
                continue
            if dst_page_ids is None:
                blocked = True
                break
            self.queue.discard(room.room)
            self.reserved[room.room] = room
            self._parked_tokens -= len(room.req.prompt_ids)
            room.dst_page_ids = dst_page_ids
            room.num_cached_tokens = room.req.cached_tokens
            room.move(RoomState.WAITING_FOR_INPUT)
            room.deadline = now + self.cfg.kv_wait_timeout_s
            room.page_list_sent_at = now
            outputs += self._send_page_list(room, peer)
        self.engine.pause_waiting(blocked)  # they came after it
        return outputs

    def _share_pending(self, room: DecodeRoom, now: float) -> bool:
        """Whether to wait before reserving (`shared_prefix_arriving`). The cap (and half
        the bootstrap deadline) guards against a stuck peer."""
        max_wait_s = min(self.cfg.kv_share_wait_s, self.cfg.bootstrap_timeout_s / 2)
        arriving = shared_prefix_arriving(room, self.reserved.values(), now, max_wait_s)
        return bool(arriving) and self.engine.prefix_arriving(room.req, arriving)

    def _send_page_list(self, room: DecodeRoom, peer: Peer) -> list[ReqOutput]:
        room.epoch = peer.epoch
        page_list = m.PageList(
            room=room.room,
            dst_page_ids=list(room.dst_page_ids),
            prompt_len=len(room.req.prompt_ids),
            num_cached_tokens=room.num_cached_tokens,
            prompt_digest=prompt_digest(room.req.prompt_ids),
        )
        try:
            self.transport.send(peer.peer_id, page_list)
        except PeerUnreachable as exc:
            reason = f"prefill worker at {peer.endpoint} is unreachable: {exc}"
            return self._fail(room.room, 503, reason, PREFILL)
        except Exception as exc:  # e.g. (cuda_ipc) every completion slot in use
            log.warning("page list to %s not sent: %s", peer.endpoint, exc)
            reason = f"page list to prefill worker at {peer.endpoint} not sent: {exc}"
            return self._fail(room.room, 503, reason)
        return []

    def _deadlines(self, now: float) -> list[ReqOutput]:
        outputs: list[ReqOutput] = []
        for room in [r for r in self.rooms.values() if now >= r.deadline]:
            if room.state is RoomState.BOOTSTRAPPING:  # queued rooms have no deadline here
                reason = (
                    f"timed out after {self.cfg.bootstrap_timeout_s:g}s waiting for the KV "
                    f"handshake with {room.endpoint}"
                )
            else:
                reason = (
                    f"timed out after {self.cfg.kv_wait_timeout_s:g}s waiting for the KV of "
                    f"room {room.room} from prefill dp rank {room.prefill_dp_rank} "
                    f"({room.endpoint})"
                )
            outputs += self._fail(room.room, 504, *self.stall.attribute(reason, now))
        return outputs

    # -- endings ---------------------------------------------------------------------
    def _fail(
        self, room_id: int, status: int, reason: str, origin: str | None = None
    ) -> list[ReqOutput]:
        """Fail the room with `status`; `origin` PREFILL when its prefill peer caused it
        (failed the room, was lost or restarted): no fault of this server."""
        room = self.rooms.get(room_id)
        if room is None:
            return []
        self._end(room, reason)
        return [error_output(room.req.rid, status, reason, origin)]

    def _end(self, room: DecodeRoom, reason: str) -> StepOutput | None:
        """Fail and forget the room; once its pages are reserved (page list sent), free them
        and tell the prefill peer, which knows of the room from then on. Returns the
        engine's abort output (None before the room reserved pages: nothing in the engine)."""
        reserved = room.state is not RoomState.BOOTSTRAPPING
        room.move(RoomState.FAILED)
        out = None
        if reserved:
            # Pages a transfer may still write stay out of use until it reports them settled.
            still_written = self.transport.forget_room(room.room)
            out = self.engine.abort(room.req.rid, reason, keep_page_ids=still_written)
            peer = self.peers.get(room.endpoint)
            if peer is not None:
                self._send(peer, m.Abort(room=room.room, reason=reason))
        self._forget(room.room)
        return out

    def _forget(self, room_id: int) -> None:
        room = self.rooms.pop(room_id, None)
        if room is None:
            return
        self.transport.forget_room(room_id)
        self.queue.discard(room_id)
        if self.reserved.pop(room_id, None) is None:
            self._parked_tokens -= len(room.req.prompt_ids)
        self.room_of_rid.pop(room.req.rid, None)
        peer = self.peers.get(room.endpoint)
        if peer is not None:
            peer.rooms.discard(room_id)

    # -- peers -------------------------------------------------------------------------
    def _peer(self, endpoint: str, now: float) -> Peer:
        peer = self.peers.get(endpoint)
        if peer is None:
            peer = Peer(endpoint, self.transport.connect(endpoint))
            self.peers[endpoint] = peer
            self.peer_by_id[peer.peer_id] = peer
        if not peer.handshake_sent:
            peer.handshake_sent, peer.lost_at = True, None
            handshake = m.Handshake(
                decode_id=self.decode_id,
                layout=self.layout,
                backend=self.transport.name,
                epoch=self.epoch,
                transfer_meta=self.transport.handshake_meta(),
                prefill_endpoint=endpoint,
            )
            peer.handshake = kv_auth.sign(self.cfg.disagg_secret, handshake, time.time())
            self._send(peer, peer.handshake)
        return peer

    def _send(self, peer: Peer, msg: m.ChannelMsg) -> bool:
        try:
            self.transport.send(peer.peer_id, msg)
            return True
        except Exception as exc:  # a vanished peer must fail rooms, not the worker
            log.warning("send to %s failed: %s", peer.endpoint, exc)
            return False

    def close(self) -> None:
        self.transport.close()


def _now() -> float:
    return time.monotonic()
