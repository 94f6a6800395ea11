"""Per-room transfer state shared by both sides (PROTOCOL.md section 5.4), pure.

Bootstrapping -> WaitingForInput -> Transferring -> Success, or Failed from any state;
Failed wins, the others only move forward. Runs inside worker processes.
"""

from __future__ import annotations

import enum

from pdserve.engine.request import FinishReason
from pdserve.serving.protocol import ReqOutput


class RoomState(enum.IntEnum):
    BOOTSTRAPPING = 0
    WAITING_FOR_INPUT = 1
    TRANSFERRING = 2
    SUCCESS = 3
    FAILED = 4


def advance(current: RoomState, new: RoomState) -> RoomState:
    """The state after an event that suggests `new`: failure wins, terminal states stay,
    everything else only moves forward (a late or duplicate event changes nothing)."""
    if current in (RoomState.SUCCESS, RoomState.FAILED):
        return current
    if new is RoomState.FAILED:
        return new
    return max(current, new)


def error_output(rid: str, status: int, message: str) -> ReqOutput:
    """The message that fails a request on its front end with `status` and a reason."""
    return ReqOutput(
        rid=rid,
        finish_reason=FinishReason("abort", message=message),
        error_status=status,
        error_message=message,
    )
