"""Load-balance policy of the DP controller: which worker gets the next request. Pure.

Runs in the front-end process; takes the per-rank loads as plain values (no I/O, no clock).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.serving.config import LB_METHODS
from pdserve.serving.hooks import RequestError
from pdserve.serving.pd_fields import home_rank


@dataclass(frozen=True)
class RankLoad:
    num_reqs: int  # requests in flight on that rank
    num_tokens: int  # tokens they hold (prompt + generated so far)
    alive: bool = True


class LoadBalancePolicy:
    """`method` is a resolved method name (never "auto")."""

    def __init__(self, method: str, dp_size: int):
        if method not in LB_METHODS:
            raise ValueError(f"unknown load-balance method {method!r}")
        self.method = method
        self.dp_size = dp_size
        self._next_rr = 0

    def choose(self, loads: list[RankLoad], room: int | None, routed_rank: int | None) -> int:
        """The rank for one request; RequestError when no acceptable rank exists."""
        if routed_rank is not None:
            if not loads[routed_rank].alive:
                raise RequestError(503, f"dp rank {routed_rank} is not running")
            return routed_rank
        alive = [r for r in range(self.dp_size) if loads[r].alive]
        if not alive:
            raise RequestError(503, "no worker is running")
        if self.method == "follow_bootstrap_room":
            return self._follow_room(loads, room)
        if self.method == "round_robin":
            return self._round_robin(alive)
        key = (
            (lambda r: loads[r].num_reqs)
            if self.method == "shortest_queue"
            else (lambda r: loads[r].num_tokens)
        )
        # Ties rotate with the round-robin cursor so an idle server still spreads requests.
        start = self._next_rr
        self._next_rr = (self._next_rr + 1) % self.dp_size
        return min(alive, key=lambda r: (key(r), (r - start) % self.dp_size))

    def _follow_room(self, loads: list[RankLoad], room: int | None) -> int:
        if room is None:
            raise RequestError(
                400, "load-balance method follow_bootstrap_room needs bootstrap_room in the request"
            )
        rank = home_rank(room, self.dp_size)
        if not loads[rank].alive:
            raise RequestError(
                503, f"dp rank {rank} (bootstrap_room {room} mod {self.dp_size}) is not running"
            )
        return rank

    def _round_robin(self, alive: list[int]) -> int:
        for _ in range(self.dp_size):
            rank = self._next_rr
            self._next_rr = (self._next_rr + 1) % self.dp_size
            if rank in alive:
                return rank
        return alive[0]
