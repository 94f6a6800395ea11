"""Worker choice policies (router process; pure). One policy object per role.

round_robin and random ignore load; power_of_two compares two random workers' estimated
load (`/get_load` tokens plus what was sent since); cache_aware sends a prompt to the worker
that served the longest prefix of it, unless loads are skewed or the match is short, in
which case it picks the least loaded worker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.config import RouterConfig
from pdserve.router.prefix_table import PrefixTable, Prompt
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

    def __init__(self, config: RouterConfig):
        self.table = PrefixTable(config.prefix_block_len, config.prefix_table_blocks)
        self.cache_threshold = config.cache_threshold
        self.balance_abs_threshold = config.balance_abs_threshold
        self.balance_rel_threshold = config.balance_rel_threshold

    def _skewed(self, workers: Sequence[Worker]) -> bool:
        loads = [w.load() for w in workers]
        spread = max(loads) - min(loads)
        return spread > self.balance_abs_threshold and max(
            loads
        ) > self.balance_rel_threshold * min(loads)

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        if not prompt or not keyable(prompt):
            return least_loaded(workers)
        chosen = None
        if not self._skewed(workers):
            matched = self.table.match(prompt, [w.url for w in workers], salt)
            best = max(workers, key=lambda w: (matched[w.url], -w.load()))
            if matched[best.url] >= self.cache_threshold * len(prompt) and matched[best.url]:
                chosen = best
        chosen = chosen or least_loaded(workers)
        self.table.insert(prompt, chosen.url, salt)
        return chosen

    def forget(self, url: str) -> None:
        self.table.forget_worker(url)


def make_policy(name: str, config: RouterConfig, rng: random.Random) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomChoice(rng)
    if name == "power_of_two":
        return PowerOfTwo(rng)
    if name == "cache_aware":
        return CacheAware(config)
    raise ValueError(f"unknown policy {name!r}")
