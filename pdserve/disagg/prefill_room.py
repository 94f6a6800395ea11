"""What a prefill worker knows of each room: the request from the front end, decode's page
list, the pages the engine handed over and the send under way; and what it remembers of a
failed room, to answer a page list that comes late; which rooms' deadlines lapsed, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.disagg import messages as m
from pdserve.disagg.delta import delta_error
from pdserve.disagg.rooms import RoomState, transition
from pdserve.engine.request import FinishReason
from pdserve.serving.protocol import ReqOutput

if TYPE_CHECKING:
    from pdserve.engine.request import Request

# The states in which the room waits for one side only, until its deadline: for the
# request, or for decode's page list. Later, decode's KV deadline and heartbeat govern.
WAITING_FOR_ONE_SIDE = (RoomState.WAITING_FOR_REQUEST, RoomState.BOOTSTRAPPING)
# A page list without its request this long is reported to the front end, which knows where
# the request went: legs sent at once bring the request within milliseconds.
UNCLAIMED_AFTER_S = 0.5


@dataclass
class PrefillRoom:
    room: int
    state: RoomState
    deadline: float
    rid: str | None = None  # the request, from the front end
    parked: Request | None = None  # the request, until the gate hands it to the engine
    prompt_len: int = 0
    prompt_digest: int = 0  # of the request's prompt (disagg.delta.prompt_digest)
    peer: object | None = None  # decode's page list: who sent it, where the KV goes
    dst_page_ids: list[int] | None = None
    dst_prompt_len: int = 0
    dst_prompt_digest: int | None = None  # of decode's prompt, from its page list
    num_cached_tokens: int = 0  # decode holds these prompt tokens: their pages are not sent
    # Handed over by the engine once the prompt is computed; held until engine.release().
    src_page_ids: list[int] | None = None
    first: m.FirstToken | None = None
    send_handle: object | None = None
    arrived_at: float = 0.0  # the request, at this worker
    computed_at: float = 0.0  # its first token
    send_started_at: float = 0.0
    reported_unclaimed: bool = False  # its page list, without a request, told the front end

    def move(self, dst: RoomState) -> None:
        self.state = transition(self.room, self.state, dst)

    def send_error(self, page_size: int) -> str | None:
        """Why the room's KV must not go to decode's pages, or None."""
        mismatch = delta_error(
            self.num_cached_tokens,
            self.prompt_len,
            page_size,
            len(self.src_page_ids or []),
            len(self.dst_page_ids or []),
        )
        if self.dst_prompt_len != self.prompt_len or mismatch:
            return (
                f"room {self.room}: decode expects {self.dst_prompt_len} prompt tokens, prefill "
                f"has {self.prompt_len}; {mismatch or 'pages agree'} (do both servers use the "
                f"same model, tokenizer and --page-size?)"
            )
        if self.dst_prompt_digest is None:
            return f"room {self.room}: decode's page list carries no prompt digest"
        if self.dst_prompt_digest != self.prompt_digest:
            return (
                f"room {self.room}: the prompt decode holds is not the one prefill computed "
                f"(same length, other tokens): both legs of a room must carry the same prompt"
            )
        return None

    def sent_output(self, sent_at: float, kv_bytes: int) -> ReqOutput:
        """The request's finish once its KV is sent, with the transfer's figures."""
        return ReqOutput(
            rid=self.rid,
            finish_reason=FinishReason("length"),
            kv_bytes=kv_bytes,
            kv_transfer_s=sent_at - self.send_started_at,
            stage_s=self.stages(sent_at),
        )

    def stages(self, sent_at: float) -> dict[str, float]:
        """Where the room's time went on prefill: queued (parked too) and computed, then
        waiting for decode's page list (0 when it came before the first token), then sending."""
        return {
            "prefill_compute": self.computed_at - self.arrived_at,
            "prefill_page_list_wait": max(0.0, self.send_started_at - self.computed_at),
            "prefill_send": sent_at - self.send_started_at,
        }


@dataclass
class FailedRoom:
    reason: str
    status: int
    expires_at: float
    origin: str | None = None  # of the error a request for the room gets (DECODE_ORIGIN)

    def answer(self, room: int) -> m.RoomStatus:
        """What decode is told of the room, when its page list or a lease comes late."""
        return failed_status(room, self.reason, self.status, self.origin)


def failed_status(room: int, reason: str, status: int, origin: str | None) -> m.RoomStatus:
    """Decode's word that the room failed here (`origin`: DECODE_ORIGIN when its fault)."""
    return m.RoomStatus(room=room, ok=False, error=reason, error_status=status, error_origin=origin)


def newly_unclaimed(rooms: list[PrefillRoom], now: float, timeout_s: float) -> list[int]:
    """The rooms whose page list came at least UNCLAIMED_AFTER_S ago without their request
    (such a room's deadline is its page list's arrival + `timeout_s`), not reported before;
    they are marked reported."""
    found = []
    for room in rooms:
        if room.state is RoomState.WAITING_FOR_REQUEST and not room.reported_unclaimed:
            if room.deadline - now <= timeout_s - UNCLAIMED_AFTER_S:
                room.reported_unclaimed = True
                found.append(room.room)
    return found


@dataclass(frozen=True)
class Lapse:
    """A room whose wait for one side outlived its deadline: it fails with `reason` (504)."""

    room: int
    reason: str
    for_decode: bool  # decode's page list never came (else the request never came)


def lapsed(rooms: list[PrefillRoom], now: float, dp_rank: int, timeout_s: float) -> list[Lapse]:
    """The rooms waiting for one side (WAITING_FOR_ONE_SIDE) whose deadline has passed."""
    found = []
    for room in rooms:
        if room.state not in WAITING_FOR_ONE_SIDE or now < room.deadline:
            continue
        if room.state is RoomState.WAITING_FOR_REQUEST:
            reason = (
                f"prefill dp rank {dp_rank} never received the request for room "
                f"{room.room} within {timeout_s:g}s"
            )
            found.append(Lapse(room.room, reason, for_decode=False))
        else:  # decode did not take the KV: a stuck (e.g. frozen) decode worker
            reason = (
                f"timed out after {timeout_s:g}s waiting for decode's page list for room "
                f"{room.room}"
            )
            found.append(Lapse(room.room, reason, for_decode=True))
    return found
