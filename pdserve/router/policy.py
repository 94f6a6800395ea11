"""Worker choice policies (router process; pure). One policy object per role.

round_robin and random ignore load; power_of_two compares two random workers' estimated
load (`/get_load` tokens plus what was sent since); cache_aware sends a prompt to the worker
that served the longest prefix of it, unless loads are skewed or the match is short, in
which case it picks the least loaded worker. With --dp-aware cache_aware remembers the DP
rank too, and sends the prefix back to that rank: a server's ranks do not share a cache.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.config import RouterConfig
from pdserve.router.prefix_table import Owner, PrefixTable, Prompt
from pdserve.router.workers import Worker


class Policy:
    name = "base"
    uses_salt = False  # whether choose() reads the request's prefix-cache salt

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        """`workers` is non-empty and holds only available workers; `salt`: the key of the
        request's prefix-cache salt (serving/cache_salt.py), or None."""
        raise NotImplementedError

    def forget(self, url: str) -> None:
        """The worker left the registry."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        worker = workers[self._counter % len(workers)]
        self._counter += 1
        return worker


class RandomChoice(Policy):
    name = "random"

    def __init__(self, rng: random.Random):
        self._rng = rng

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        return self._rng.choice(workers)


def least_loaded(workers: Sequence[Worker]) -> Worker:
    return min(workers, key=lambda w: (w.load(), w.in_flight))


class PowerOfTwo(Policy):
    name = "power_of_two"

    def __init__(self, rng: random.Random):
        self._rng = rng

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        if len(workers) == 1:
            return workers[0]
        return least_loaded(self._rng.sample(list(workers), 2))


def keyable(prompt: Prompt) -> bool:
    """Text or token ids, which the prefix table keys on; other ids (lists, objects) are
    routed by load, and the server answers them with its 400."""
    return isinstance(prompt, str) or all(isinstance(t, int) for t in prompt)


class CacheAware(Policy):
    name = "cache_aware"
    uses_salt = True

    def __init__(self, config: RouterConfig, per_rank: bool = False):
        self.table = PrefixTable(config.prefix_block_len, config.prefix_table_blocks)
        self.cache_threshold = config.cache_threshold
        self.balance_abs_threshold = config.balance_abs_threshold
        self.balance_rel_threshold = config.balance_rel_threshold
        self.per_rank = per_rank  # --dp-aware: the router names the rank

    def _skewed(self, loads: Sequence[int]) -> bool:
        spread = max(loads) - min(loads)
        return spread > self.balance_abs_threshold and max(
            loads
        ) > self.balance_rel_threshold * min(loads)

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        return self.choose_with_rank(workers, prompt, salt)[0]

    def choose_with_rank(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> tuple[Worker, int | None]:
        """The worker and, per rank, the DP rank (else None) that served the longest prefix
        of the prompt, if it covers `cache_threshold` of it and loads are not skewed; else
        the least loaded worker (and its least busy rank)."""
        if not prompt or not keyable(prompt):
            return self._least_loaded(workers)
        owners = {_owner(w.url, rank): (w, rank) for w in workers for rank in self._ranks(w)}
        loads = {owner: _load(*pair) for owner, pair in owners.items()}
        chosen = None
        if not self._skewed(list(loads.values())):
            matched = self.table.match(prompt, list(owners), salt)
            best = max(owners, key=lambda o: (matched[o], -loads[o]))
            if matched[best] >= self.cache_threshold * len(prompt) and matched[best]:
                chosen = owners[best]
        chosen = chosen or self._least_loaded(workers)
        self.table.insert(prompt, _owner(chosen[0].url, chosen[1]), salt)
        return chosen

    def _ranks(self, worker: Worker) -> range | tuple[None]:
        return range(worker.dp_size) if self.per_rank else (None,)

    def _least_loaded(self, workers: Sequence[Worker]) -> tuple[Worker, int | None]:
        worker = least_loaded(workers)
        return worker, worker.choose_rank() if self.per_rank else None

    def forget(self, url: str) -> None:
        self.table.forget_worker(url)


def _owner(url: str, rank: int | None) -> Owner:
    """The prefix table's key for a worker, or for one of its DP ranks."""
    return url if rank is None else (url, rank)


def _load(worker: Worker, rank: int | None) -> int:
    """The worker's estimated load, or the rank's tokens in flight: a prefix every request
    shares (a system prompt) would otherwise hold one rank of a server for good."""
    return worker.load() if rank is None else worker.rank_load(rank)


def make_policy(name: str, config: RouterConfig, rng: random.Random) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomChoice(rng)
    if name == "power_of_two":
        return PowerOfTwo(rng)
    if name == "cache_aware":
        return CacheAware(config, per_rank=config.dp_aware)
    raise ValueError(f"unknown policy {name!r}")
