"""Bootstrap room generation (router process; pure).

A room is a uniform random integer in [0, 2**63). With `--align-room` the router draws it so
that `room % num_prefill_ranks == chosen prefill rank`, which makes the prefill server's
follow_bootstrap_room dispatch and the decode server's fast path agree with the router's pick.
"""

from __future__ import annotations

import os
import random

ROOM_LIMIT = 1 << 63


class RoomSource:
    """Draws rooms. One per router; `rng` is injectable so tests can be deterministic."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random(os.urandom(16))

    def draw(self) -> int:
        return self._rng.getrandbits(63)

    def draw_aligned(self, num_ranks: int, rank: int) -> int:
        """Uniform among rooms R in [0, 2**63) with R % num_ranks == rank."""
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} out of range for {num_ranks} ranks")
        # Number of k >= 0 with k * num_ranks + rank < ROOM_LIMIT.
        num_choices = (ROOM_LIMIT - rank + num_ranks - 1) // num_ranks
        return self._rng.randrange(num_choices) * num_ranks + rank

    def draw_many(
        self, count: int, num_ranks: int | None = None, rank: int | None = None
    ) -> list[int]:
        """`count` distinct rooms (aligned when `num_ranks` and `rank` are given)."""
        rooms: dict[int, None] = {}  # ordered, with O(1) membership for large batches
        while len(rooms) < count:
            room = self.draw() if num_ranks is None else self.draw_aligned(num_ranks, rank or 0)
            rooms.setdefault(room)  # a repeat inside one request would be a 400 downstream
        return list(rooms)
