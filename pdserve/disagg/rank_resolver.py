"""DP rank resolution, docs/protocol.md section 4: the pure decisions, no I/O.

The prefill front end calls `decide_prefill` when its DP controller has picked worker r;
the decode front end calls `resolve_decode` once it knows the prefill server's info.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pdserve.serving.pd_fields import home_rank

FOLLOW_BOOTSTRAP_ROOM = "follow_bootstrap_room"


class RankError(ValueError):
    """A request whose ranks cannot be honoured; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def registers_all_rooms(method: str, force: bool) -> bool:
    """What a prefill server advertises: does it register every room's rank?"""
    return force or method != FOLLOW_BOOTSTRAP_ROOM


def check_rank(name: str, rank: int, dp_size: int) -> int:
    """A rank the request names (its type was checked where the request came in) against
    the prefill server's dp_size."""
    if not 0 <= rank < dp_size:
        raise RankError(f"{name}={rank} is out of range for prefill dp_size={dp_size}")
    return rank


def conflict_message(room: int, rank: int, dp_size: int) -> str:
    return (
        f"follow_bootstrap_room conflict: dispatched to dp_rank {rank} but bootstrap_room "
        f"{room} implies dp_rank {home_rank(room, dp_size)}; set "
        "PDSERVE_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing"
    )


class PrefillAction(enum.Enum):
    NOTHING = "nothing"  # decode finds the rank without asking (fast path, explicit, single)
    REGISTER = "register"  # publish room -> rank in the bootstrap registry
    FORWARD = "forward"  # served where dispatched; home(R) redirects decode's page list here


def decide_prefill(
    room: int,
    rank: int,
    dp_size: int,
    method: str,
    force: bool,
    explicit_rank: int | None,
    forward: bool = False,
    moves_kv: bool = True,
) -> PrefillAction:
    """Prefill side after dispatch to worker `rank`; raises RankError when the request must
    fail (and with it, the decode leg of the same room). `forward` (--rank-mismatch forward)
    turns the follow_bootstrap_room conflict into FORWARD. A request that moves no KV
    (max_new_tokens 0: its decode leg answers at once, resolving no rank) breaks no rank rule:
    refusing it would fail this leg while decode's answers 200."""
    if not moves_kv:  # not even a rank out of range: decode, which cannot tell, answers 200
        return PrefillAction.NOTHING
    if explicit_rank is not None:
        check_rank("disagg_prefill_dp_rank", explicit_rank, dp_size)
    if dp_size == 1:
        return PrefillAction.NOTHING
    if explicit_rank is not None and explicit_rank != rank:
        raise RankError(
            f"disagg_prefill_dp_rank={explicit_rank} but the request was dispatched to prefill "
            f"dp_rank {rank}; decode would wait on the wrong worker"
        )
    # A server that advertises registers_all_rooms must keep that promise for every room,
    # aligned or not, explicit or not: a decode leg without the explicit rank will query.
    if registers_all_rooms(method, force):
        return PrefillAction.REGISTER
    if explicit_rank is not None or rank == home_rank(room, dp_size):
        return PrefillAction.NOTHING
    if forward:
        return PrefillAction.FORWARD
    raise RankError(conflict_message(room, rank, dp_size))


class ResolvePath(enum.Enum):
    EXPLICIT = "explicit"
    SINGLE_RANK = "single_rank"
    FAST_PATH = "fast_path"
    QUERY = "query"


@dataclass(frozen=True)
class PrefillServerInfo:
    """The part of `GET /route` that rank resolution needs."""

    dp_size: int
    follow_bootstrap_room: bool
    registers_all_rooms: bool


def resolve_decode(
    room: int, info: PrefillServerInfo, explicit_rank: int | None
) -> tuple[ResolvePath, int | None]:
    """Decode side: (path, rank); rank is None when the path is QUERY. The prefill server's
    advertised behaviour decides, so FORCE set on one side only cannot split the sides."""
    if explicit_rank is not None:
        return ResolvePath.EXPLICIT, check_rank(
            "disagg_prefill_dp_rank", explicit_rank, info.dp_size
        )
    if info.dp_size == 1:
        return ResolvePath.SINGLE_RANK, 0
    if info.follow_bootstrap_room and not info.registers_all_rooms:
        return ResolvePath.FAST_PATH, home_rank(room, info.dp_size)
    return ResolvePath.QUERY, None
