"""The state of one PD room on either side, and the one `transition` that moves it. Pure;
runs inside prefill and decode worker processes.

Prefill: WAITING_FOR_REQUEST (decode's page list came first) or BOOTSTRAPPING (the request
came first) -> WAITING_FOR_INPUT (both here; the engine computes the KV) -> TRANSFERRING
(pages being sent) -> SUCCESS. Decode: BOOTSTRAPPING (handshake, free pages) ->
WAITING_FOR_INPUT (page list sent) -> TRANSFERRING (the KV arrived, its status is checked)
-> SUCCESS. FAILED from any live state; SUCCESS and FAILED are final.
"""

from __future__ import annotations

import enum

from pdserve.engine.request import FinishReason
from pdserve.serving.protocol import ReqOutput


class RoomState(enum.Enum):
    WAITING_FOR_REQUEST = "waiting_for_request"
    BOOTSTRAPPING = "bootstrapping"
    WAITING_FOR_INPUT = "waiting_for_input"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


FINAL = frozenset({RoomState.SUCCESS, RoomState.FAILED})

_FORWARD: dict[RoomState, RoomState] = {
    RoomState.WAITING_FOR_REQUEST: RoomState.WAITING_FOR_INPUT,
    RoomState.BOOTSTRAPPING: RoomState.WAITING_FOR_INPUT,
    RoomState.WAITING_FOR_INPUT: RoomState.TRANSFERRING,
    RoomState.TRANSFERRING: RoomState.SUCCESS,
}


class IllegalRoomTransition(RuntimeError):
    """A move the protocol does not allow: a bug here or a peer breaking the protocol. The
    caller handles expected late or duplicate events before asking for a move."""


def can_transition(src: RoomState, dst: RoomState) -> bool:
    if src in FINAL:
        return False
    return dst is RoomState.FAILED or _FORWARD[src] is dst


def transition(room: int, src: RoomState, dst: RoomState) -> RoomState:
    """`dst`, or IllegalRoomTransition: each live state has one way forward, failure wins
    from any live state, and a final state never moves (not even to itself)."""
    if not can_transition(src, dst):
        raise IllegalRoomTransition(f"room {room}: {src.value} -> {dst.value}")
    return dst


def error_output(rid: str, status: int, message: str, origin: str | None = None) -> ReqOutput:
    """The message that fails a request on its front end with `status` and a reason (and
    the peer whose fault it is: `hooks.PREFILL_ORIGIN` or `hooks.DECODE_ORIGIN`)."""
    return ReqOutput(
        rid=rid,
        finish_reason=FinishReason("abort", message=message),
        error_status=status,
        error_message=message,
        error_origin=origin,
    )
