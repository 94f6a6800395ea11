"""Which worker recently served which prompt prefix (router process; pure).

A hashed radix tree at block granularity: a prompt (text or token ids) is cut into blocks
of `block_len`; block i is keyed by a hash chained over blocks 0..i, so a key stands for a
whole prefix. Each key maps to the workers that served that prefix (their URLs, or with
--dp-aware (URL, DP rank) pairs). Once more than
`max_blocks` keys are stored, the least recently used go first. A salted request's chain
starts from its salt (its key, `serving/cache_salt.py`), as the servers' page hashes do: it
matches only prefixes served under the same salt, the only ones it can find cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

Prompt = str | Sequence[int]
Owner = str | tuple[str, int]  # a worker's URL, or (URL, DP rank)


def prefix_keys(prompt: Prompt, block_len: int, salt: str | None = None) -> list[int]:
    """One key per whole block; a trailing partial block is not remembered."""
    keys: list[int] = []
    key = 0 if salt is None else hash(("salt", salt))
    for start in range(0, len(prompt) - block_len + 1, block_len):
        block = prompt[start : start + block_len]
        key = hash((key, block if isinstance(block, str) else tuple(block)))
        keys.append(key)
    return keys


class PrefixTable:
    def __init__(self, block_len: int, max_blocks: int):
        self.block_len = block_len
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, set[Owner]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def match(
        self, prompt: Prompt, candidates: Sequence[Owner], salt: str | None = None
    ) -> dict[Owner, int]:
        """For each candidate: how many leading prompt elements it has served (under
        `salt`)."""
        matched = dict.fromkeys(candidates, 0)
        alive = set(candidates)
        for i, key in enumerate(prefix_keys(prompt, self.block_len, salt)):
            owners = self._owners.get(key)
            if owners is None:
                break
            alive &= owners
            if not alive:
                break
            for owner in alive:
                matched[owner] = (i + 1) * self.block_len
        return matched

    def insert(self, prompt: Prompt, owner: Owner, salt: str | None = None) -> None:
        # Deepest block first, so a prefix is always fresher than its extensions and LRU
        # eviction trims leaves before the shared stem (a lost stem would orphan its leaves).
        for key in reversed(prefix_keys(prompt, self.block_len, salt)):
            owners = self._owners.get(key)
            if owners is None:
                self._owners[key] = {owner}
            else:
                owners.add(owner)
                self._owners.move_to_end(key)
        while len(self._owners) > self.max_blocks:
            self._owners.popitem(last=False)

    def forget_worker(self, url: str) -> None:
        """Forgets the worker, and each of its DP ranks."""
        for key in list(self._owners):
            owners = self._owners[key]
            owners.difference_update([o for o in owners if _url(o) == url])
            if not owners:
                del self._owners[key]


def _url(owner: Owner) -> str:
    return owner if isinstance(owner, str) else owner[0]
