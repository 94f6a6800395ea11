"""kv_aware: choose the worker (and DP rank) whose real KV cache holds the longest prefix of
the prompt, weighed against its load (router process; pure).

The cache contents come from the servers' KV events (`kv_index.py`). The cost of a
candidate is the prompt tokens it would still compute (or, for decode, receive) plus those
that the requests this router has in flight there make it compute or receive, and, on
decode, the tokens they may still generate (exact and fresh; a `/get_load` report lags by
its refresh period, long enough to send a conversation away from its cache); the cheapest
wins. Counting whole prompts in flight instead made a rank busy with mostly cached turns, or
a decode rank holding long conversations, look expensive, and sent conversations away from
their history; counting no generation made the decode rank that first held a shared system
prompt draw every request behind it and decode them all in one batch.
Text and chat prompts arrive as token ids once the router holds the servers' tokenizer
(`prompt_tokens.py`); prompts without token ids, and workers that publish no events, are
scored by load alone (a match of 0). A salted request (`cache_salt`, `extra_key`) is hashed
from its salted seed, as the servers hash it: it matches only pages cached under its salt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.engine.page_hash import page_hashes, salted_seed
from pdserve.engine.request import SamplingParams
from pdserve.router.kv_index import KVIndex
from pdserve.router.policy import Policy
from pdserve.router.prefix_table import Prompt
from pdserve.router.workers import Worker


@dataclass(frozen=True)
class Candidate:
    worker: Worker
    dp_rank: int | None  # None: the server's own DP controller picks the rank
    matched_tokens: int
    load_tokens: int
    holding_rank: int | None = None  # the rank that holds `matched_tokens` (None: no match)


def cheapest(candidates: Sequence[Candidate], prompt_tokens: int) -> Candidate:
    """Least (tokens to compute + tokens in flight); ties: the longer match, then the
    order (the policy rotates it, so ties take turns)."""

    def cost(c: Candidate) -> tuple[int, int]:
        return (max(prompt_tokens - c.matched_tokens, 0) + c.load_tokens, -c.matched_tokens)

    return min(candidates, key=cost)


def output_budget(body: Mapping[str, Any]) -> int:
    """The tokens a request's decode leg is counted for in the load: its bound,
    `sampling_params.max_new_tokens` (native), `max_completion_tokens` or `max_tokens`
    (OpenAI), else `/generate`'s default (an unbounded chat answer may run longer: it is
    an estimate; chats mostly end well before the rest of the context)."""
    params = body.get("sampling_params")
    candidates = [params.get("max_new_tokens")] if isinstance(params, Mapping) else []
    candidates += [body.get("max_completion_tokens"), body.get("max_tokens")]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return SamplingParams().max_new_tokens


def prompt_page_hashes(token_ids: Sequence[int], page_size: int, seed: int) -> list[int]:
    """The prompt's page hashes; none for ids that are not token ids (strings, None, ints
    past 64 bits): the server answers such a request with its 400, routed by load."""
    try:
        return page_hashes(token_ids, page_size, seed)
    except (TypeError, ValueError, OverflowError):
        return []


def holding_rank(worker: Worker, matched: Mapping[int, int]) -> tuple[int, int | None]:
    """The worker's longest match over its ranks, and the least loaded rank holding it
    (None: no match, or only on ranks past the DP size the router knows). Taking the first
    such rank sent every local prefill of a prompt that several ranks hold to the lowest of
    them, the others idle."""
    best = max(matched.values(), default=0)
    ranks = [rank for rank, num in matched.items() if num == best and rank < worker.dp_size]
    if not best or not ranks:
        return best, None
    return best, min(ranks, key=worker.rank_load)


class KVAware(Policy):
    name = "kv_aware"
    uses_salt = True

    def __init__(self, index: KVIndex, per_rank: bool):
        self.index = index
        self.per_rank = per_rank  # --dp-aware: the router names the rank
        self._turn = 0

    def candidates(
        self, workers: Sequence[Worker], token_ids: Sequence[int], salt: str | None = None
    ) -> list[Candidate]:
        hashes_by_seed: dict[tuple[int, int], list[int]] = {}
        out = []
        for worker in workers:
            matched = {}
            cache = self.index.workers.get(worker.url)
            if cache is not None and cache.last_seq is not None:
                key = (cache.page_size, cache.hash_seed)
                if key not in hashes_by_seed:  # one hashing per model and page size
                    seed = salted_seed(cache.hash_seed, salt)
                    hashes_by_seed[key] = prompt_page_hashes(token_ids, cache.page_size, seed)
                pages = cache.matched_pages(hashes_by_seed[key])
                matched = {rank: n * cache.page_size for rank, n in pages.items()}
            if self.per_rank:
                for rank in range(worker.dp_size):
                    num = matched.get(rank, 0)
                    load = worker.rank_load(rank)
                    out.append(Candidate(worker, rank, num, load, rank if num else None))
            else:
                best, holding = holding_rank(worker, matched)
                out.append(Candidate(worker, None, best, worker.tokens_in_flight, holding))
        return out

    def choose(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Worker:
        return self.score(workers, prompt, salt).worker

    def score(
        self, workers: Sequence[Worker], prompt: Prompt | None, salt: str | None = None
    ) -> Candidate:
        """`workers` is non-empty and holds only available workers; `salt`: the request's
        prefix-cache salt."""
        token_ids = prompt if prompt is not None and not isinstance(prompt, str) else []
        # A match may cover at most len - 1 tokens: the last one is always computed.
        usable = list(token_ids[: max(len(token_ids) - 1, 0)])
        candidates = self.candidates(workers, usable, salt)
        self._turn = (self._turn + 1) % len(candidates)
        rotated = candidates[self._turn :] + candidates[: self._turn]
        return cheapest(rotated, len(token_ids))

    def forget(self, url: str) -> None:
        self.index.forget(url)
