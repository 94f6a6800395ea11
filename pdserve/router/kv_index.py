"""The router's index of every worker's cached KV pages, per DP rank, built from the
workers' KV event batches (router process; pure: the subscriber shell feeds it).

A page hash names its whole prefix, so a prompt's match on a rank is the longest run of its
page hashes, from the first, that the rank holds.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class BatchVerdict(Enum):
    APPLIED = "applied"
    GAP = "gap"  # batches are missing: replay from last_seq + 1
    RESYNC = "resync"  # no base yet, or the server started again: take a snapshot


class WorkerCache:
    def __init__(self, page_size: int = 0, hash_seed: int = 0) -> None:
        self.page_size, self.hash_seed = page_size, hash_seed  # how it hashes its pages
        self.ranks: dict[int, set[int]] = {}
        self.last_seq: int | None = None  # None: no snapshot taken yet
        self.life: int | None = None  # the server's start the base is from (None: not told)

    def _rank(self, dp_rank: int) -> set[int]:
        return self.ranks.setdefault(dp_rank, set())

    def load_snapshot(self, snapshot: dict[str, Any]) -> None:
        self.ranks = {rank: set(hashes) for rank, hashes in enumerate(snapshot["ranks"])}
        self.last_seq = int(snapshot["seq"])
        self.life = snapshot.get("life")

    def _same_life(self, batch: dict[str, Any]) -> bool | None:
        """Whether the batch is from the server's start the base is from (None: unknown,
        an older server that names no life)."""
        life = batch.get("life")
        return None if life is None or self.life is None else life == self.life

    def offer(self, batch: dict[str, Any]) -> BatchVerdict:
        """Apply the batch if it is the next one; an older one (replayed) was applied."""
        seq = int(batch["seq"])
        if self.last_seq is None or self._same_life(batch) is False:
            return BatchVerdict.RESYNC
        if seq <= self.last_seq:
            return BatchVerdict.APPLIED
        if seq > self.last_seq + 1:
            return BatchVerdict.GAP
        for event in batch["events"]:
            self._apply(event)
        self.last_seq = seq
        return BatchVerdict.APPLIED

    def offer_live(self, batch: dict[str, Any]) -> BatchVerdict:
        """A batch from the PUB stream. One not past the last applied either raced the
        snapshot (same life: it is in the base already) or comes from a new life of the
        server, which numbers from 1 again (a server that names no life: assumed so)."""
        if self.last_seq is not None and int(batch["seq"]) <= self.last_seq:
            return BatchVerdict.APPLIED if self._same_life(batch) else BatchVerdict.RESYNC
        return self.offer(batch)

    def _apply(self, event: dict[str, Any]) -> None:
        kind, rank = event["type"], int(event["dp_rank"])
        if rank < 0:  # malformed like a missing field (the follower resyncs): applied, it was
            # a rank that holds the prompt, named to decode as routed_dp_rank -1 (a 400)
            raise ValueError(f"dp_rank {rank} in a KV event")
        if kind == "stored":
            self._rank(rank).update(event["page_hashes"])
        elif kind == "removed":
            self._rank(rank).difference_update(event["page_hashes"])
        elif kind == "cleared":
            self._rank(rank).clear()

    def matched_pages(self, page_hashes: list[int]) -> dict[int, int]:
        """Per DP rank, how many leading pages of the chain it holds."""
        matched = {}
        for rank, cached in self.ranks.items():
            num = 0
            while num < len(page_hashes) and page_hashes[num] in cached:
                num += 1
            matched[rank] = num
        return matched


class KVIndex:
    """One `WorkerCache` per worker URL that publishes events."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerCache] = {}

    def track(self, url: str, page_size: int = 0, hash_seed: int = 0) -> WorkerCache:
        """A fresh cache for the worker (replacing any earlier one)."""
        self.workers[url] = WorkerCache(page_size, hash_seed)
        return self.workers[url]

    def forget(self, url: str) -> None:
        self.workers.pop(url, None)

    def matched_pages(self, url: str, page_hashes: list[int]) -> dict[int, int]:
        """Per DP rank of the worker; empty when it is not tracked or not synchronised."""
        cache = self.workers.get(url)
        if cache is None or cache.last_seq is None:
            return {}
        return cache.matched_pages(page_hashes)

    def describe(self) -> dict[str, Any]:
        """Per worker: the last batch applied (None: not synchronised) and pages per rank."""
        return {
            url: {
                "seq": cache.last_seq,
                "num_cached_pages": {r: len(h) for r, h in sorted(cache.ranks.items())},
            }
            for url, cache in self.workers.items()
        }
