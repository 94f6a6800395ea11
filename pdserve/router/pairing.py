"""Choosing the workers, ranks and rooms of one attempt (router process; pure)."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pdserve.router.body import LegPlan, new_rids
from pdserve.router.config import ROLES, Role, RouterConfig
from pdserve.router.policy import Policy, make_policy
from pdserve.router.prefix_table import Prompt
from pdserve.router.rooms import RoomSource
from pdserve.router.workers import Worker, WorkerRegistry


class NoWorker(Exception):
    """No available worker for a role (the router answers 503)."""


@dataclass
class Pair:
    decode: Worker  # in plain (non-PD) mode: the one worker
    prefill: Worker | None = None
    plan: LegPlan | None = None  # None in plain mode
    prefill_rank: int | None = None  # the rank the router steers to (dp-aware or align-room)
    decode_rank: int | None = None


class PairChooser:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, rng: random.Random):
        self.config = config
        self.registry = registry
        self.rooms = RoomSource(rng)
        self.policies: dict[Role, Policy] = {
            role: make_policy(config.policy_for(role), config, rng) for role in ROLES
        }

    def _pick(
        self, role: Role, now: float, prompt: Prompt | None, avoid: Collection[str]
    ) -> Worker:
        workers = self.registry.available(role, now, exclude=avoid)
        if not workers and avoid:  # better a worker that failed once than none
            workers = self.registry.available(role, now)
        if not workers:
            total = len(self.registry.by_role(role))
            raise NoWorker(f"no healthy {role} server available ({total} registered)")
        return self.policies[role].choose(workers, prompt)

    def choose(
        self,
        route: str,
        body: dict[str, Any],
        num_seqs: int | None,
        prompt: Prompt | None,
        now: float,
        avoid: Collection[str] = (),
    ) -> Pair:
        """Raises NoWorker. `avoid`: workers that already failed this request."""
        if self.registry.by_role("regular"):
            return Pair(self._pick("regular", now, prompt, avoid))
        prefill = self._pick("prefill", now, prompt, avoid)
        decode = self._pick("decode", now, prompt, avoid)
        c = self.config
        prefill_rank = prefill.choose_rank() if (c.dp_aware or c.align_room) else None
        decode_rank = decode.choose_rank() if c.dp_aware else None
        count = num_seqs or 1
        if c.align_room and prefill_rank is not None:
            rooms = self.rooms.draw_many(count, prefill.dp_size, prefill_rank)
        else:
            rooms = self.rooms.draw_many(count)
        plan = LegPlan(
            bootstrap_host=prefill.spec.host,
            bootstrap_port=prefill.spec.bootstrap_port,
            rooms=rooms,
            num_seqs=num_seqs,
            rid=body.get("rid") or new_rids(num_seqs),
            prefill_rank=prefill_rank if c.dp_aware else None,
            decode_rank=decode_rank,
        )
        return Pair(decode, prefill, plan, prefill_rank, decode_rank)

    def forget(self, url: str) -> None:
        for policy in self.policies.values():
            policy.forget(url)
