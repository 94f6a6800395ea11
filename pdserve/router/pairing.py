"""Choosing the workers, ranks and rooms of one attempt (router process; pure)."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pdserve.router.body import LegPlan, new_rids, several_prompts
from pdserve.router.config import ROLES, Role, RouterConfig
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_policy import Candidate, KVAware
from pdserve.router.policy import CacheAware, Policy, make_policy
from pdserve.router.prefix_table import Prompt
from pdserve.router.rooms import RoomSource
from pdserve.router.workers import Worker, WorkerRegistry, stuck_reasons
from pdserve.serving.cache_salt import CacheSaltError, body_salt_key


class NoWorker(Exception):
    """No available worker for a role (the router answers 503)."""


@dataclass
class Pair:
    decode: Worker  # in plain (non-PD) mode: the one worker
    prefill: Worker | None = None
    plan: LegPlan | None = None  # None in plain mode
    prefill_rank: int | None = None  # the rank the router steers to (dp-aware or align-room)
    decode_rank: int | None = None
    # kv_aware: prompt tokens the chosen servers hold, as the router's index saw them
    prefill_matched_tokens: int = 0
    decode_matched_tokens: int = 0
    local_prefill: bool = False  # decode alone computes the prompt (no prefill, no plan)


class PairChooser:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, rng: random.Random):
        self.config = config
        self.registry = registry
        self.rooms = RoomSource(rng)
        self.kv_index = KVIndex()
        self.policies: dict[Role, Policy] = {
            role: self._make_policy(config.policy_for(role), rng) for role in ROLES
        }
        self._uses_salt = any(p.uses_salt for p in self.policies.values())

    def _make_policy(self, name: str, rng: random.Random) -> Policy:
        if name == KVAware.name:
            return KVAware(self.kv_index, per_rank=self.config.dp_aware)
        return make_policy(name, self.config, rng)

    @property
    def follows_kv_events(self) -> bool:
        return any(isinstance(p, KVAware) for p in self.policies.values())

    def _pick(
        self,
        role: Role,
        now: float,
        prompt: Prompt | None,
        avoid: Collection[str],
        salt: str | None = None,
    ) -> Candidate:
        """The worker, the DP rank kv_aware chose (or None) and the prompt tokens it holds
        (under the request's prefix-cache `salt`, its key: serving/cache_salt.py)."""
        workers = self.registry.available(role, now, exclude=avoid)
        if not workers and avoid:  # better a worker that failed once than none
            workers = self.registry.available(role, now)
        if not workers:  # better a healthy server whose breaker is probing than a 503
            workers = self.registry.probing(role, now)
        if not workers:
            raise NoWorker(self._none_available(role, now))
        policy = self.policies[role]
        if isinstance(policy, KVAware):
            return policy.score(workers, prompt, salt)
        if isinstance(policy, CacheAware):
            worker, rank = policy.choose_with_rank(workers, prompt, salt)
            return Candidate(worker, rank, 0, 0)
        return Candidate(policy.choose(workers, prompt, salt), None, 0, 0)

    def _none_available(self, role: Role, now: float) -> str:
        """Why no server of the role takes requests: failing health checks, or (passing
        them) an open circuit breaker, which the message alone used not to tell apart."""
        registered = self.registry.by_role(role)
        why = [f"{len(registered)} registered"]
        unchecked = [w for w in registered if not w.health.checked]
        if unchecked:  # a router just (re)started: they did not fail anything
            why.append(f"{len(unchecked)} not health-checked yet")
        unhealthy = [w for w in registered if w.health.checked and not w.health.healthy]
        if unhealthy:
            why.append(f"{len(unhealthy)} failing health checks{stuck_reasons(unhealthy)}")
        held = [w for w in registered if w.health.healthy]  # out: their breaker is open
        if held:
            wait_s = min(max(w.breaker.open_until - now, 0.0) for w in held)
            why.append(
                f"{len(held)} with an open circuit breaker after failed requests "
                f"(tried again in {wait_s:.1f} s)"
            )
        return f"no healthy {role} server available ({', '.join(why)})"

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
        salt = None
        if self._uses_salt:  # its key digests the whole salt (MiBs): only where it is read
            try:
                salt = body_salt_key(body)
            except CacheSaltError:  # the servers answer 400: route it by load alone
                prompt = None
        if self.registry.by_role("regular"):
            plain = self._pick("regular", now, prompt, avoid, salt)
            return Pair(
                plain.worker, decode_rank=plain.dp_rank, decode_matched_tokens=plain.matched_tokens
            )
        c = self.config
        # Only the first prompt is scored: a batch of several is never computed on decode
        # alone (its other prompts, uncached there, could be of any length).
        if c.local_prefill_threshold and not several_prompts(route, body):
            best_decode = self._pick("decode", now, prompt, avoid, salt)
            # Only with a rank to name: the match may be on a rank past the DP size the
            # router knows (a server started again with more ranks, not yet seen), and a
            # decode server's own pick would compute the whole prompt (or, under
            # follow_bootstrap_room, refuse the request for its missing room).
            holding = best_decode.holding_rank
            if holding is not None and self._decode_holds_enough(
                prompt, best_decode.matched_tokens
            ):
                # The rank that holds the prompt, --dp-aware or not: on another rank decode
                # would compute the whole prompt itself.
                return Pair(
                    best_decode.worker,
                    decode_rank=holding,
                    decode_matched_tokens=best_decode.matched_tokens,
                    local_prefill=True,
                )
            best_prefill = self._pick("prefill", now, prompt, avoid, salt)
        else:
            best_prefill = self._pick("prefill", now, prompt, avoid, salt)
            best_decode = self._pick("decode", now, prompt, avoid, salt)
        prefill, prefill_kv_rank = best_prefill.worker, best_prefill.dp_rank
        decode, decode_kv_rank = best_decode.worker, best_decode.dp_rank
        prefill_matched, decode_matched = best_prefill.matched_tokens, best_decode.matched_tokens
        prefill_rank = prefill_kv_rank
        if c.align_room and not c.dp_aware:  # the rank the prefill server will honour
            # kv_aware: the rooms go to the rank that holds the prompt (the router's load
            # pick sent them anywhere: the rank's cache was the point of choosing the server)
            picked = best_prefill.holding_rank if prefill_rank is None else prefill_rank
            prefill_rank = _client_rank(body, prefill.dp_size, picked)
        if prefill_rank is None and (c.dp_aware or c.align_room):
            prefill_rank = prefill.choose_rank()
        decode_rank = decode_kv_rank
        if decode_rank is None and c.dp_aware:
            decode_rank = decode.choose_rank()
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
            client_rank_prefill_only=c.align_room and not c.dp_aware,
        )
        return Pair(
            decode, prefill, plan, prefill_rank, decode_rank, prefill_matched, decode_matched
        )

    def _decode_holds_enough(self, prompt: Prompt | None, decode_matched: int) -> bool:
        """Conditional disaggregation: the decode server kv_aware chose holds all but at
        most --local-prefill-threshold tokens of a token-id prompt."""
        if not isinstance(self.policies["decode"], KVAware) or decode_matched == 0:
            return False
        if prompt is None or isinstance(prompt, str):
            return False
        return len(prompt) - decode_matched <= self.config.local_prefill_threshold

    def forget(self, url: str) -> None:
        for policy in self.policies.values():
            policy.forget(url)


def _client_rank(body: dict[str, Any], dp_size: int, otherwise: int | None) -> int | None:
    """The prefill rank a client's body names (`routed_dp_rank`, or its alias
    `data_parallel_rank`; one integer in range), which the router passes on outside
    --dp-aware, so that --align-room draws its rooms on it; else `otherwise`. A batch's
    list of ranks, or a rank out of range (prefill answers 400), keeps `otherwise`."""
    for name in ("routed_dp_rank", "data_parallel_rank"):
        rank = body.get(name)
        if rank is not None:
            in_range = isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < dp_size
            return rank if in_range else otherwise
    return otherwise
