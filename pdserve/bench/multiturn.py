"""The multi-turn conversation workload: a plan of token ids, each turn's prompt built from
the last one, and the figures per turn index. Pure (numpy only, no I/O, no clock): runs in
the `pdserve bench` client; `conversations.py` is the asyncio shell that sends the turns.

Prompts are token ids for the native `/generate`: turn k+1 = turn k's prompt + the answer's
`output_ids` as the server returned them + a new user message, so every turn's prompt is
exactly the previous turn's prompt and answer as a token prefix (no re-tokenization).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.bench.metrics import RequestRecord, latency_samples, latency_stats
from pdserve.bench.workload import random_ids


@dataclass(frozen=True)
class ConversationPlan:
    """What a conversation will say, fixed by the seed before any answer comes back."""

    index: int
    system_ids: list[int]  # shared by every conversation
    user_ids: list[list[int]]  # one message per turn
    output_len: int  # max_new_tokens of every answer
    start_s: float  # when its first turn is sent, from the start of the run
    think_s: tuple[float, ...] = ()  # pause after answer i before turn i + 1 is sent

    def think_after(self, turn: int) -> float:
        """Seconds between turn `turn`'s answer (0-based) and the next turn's send."""
        return self.think_s[turn] if turn < len(self.think_s) else 0.0

    @property
    def num_turns(self) -> int:
        return len(self.user_ids)


def plan_conversations(
    rng: np.random.Generator,
    allowed_ids: Sequence[int],
    num_conversations: int,
    num_turns: int,
    system_prompt_len: int,
    user_len: int,
    output_len: int,
    stagger_s: float,
    think_time_s: float = 0.0,
    think_time_dist: str = "constant",
) -> list[ConversationPlan]:
    """`num_conversations` conversations sharing one system prompt; conversation i starts at
    `i * stagger_s`. User messages differ between conversations and turns. Between an answer
    and the next turn a user thinks `think_time_s` seconds (`constant`), or a time drawn from
    an exponential distribution of that mean (`exponential`): users who think for different
    times drift apart, as real chat traffic does, instead of sending their turns in step."""
    system_ids = random_ids(rng, allowed_ids, system_prompt_len)
    users = [
        [random_ids(rng, allowed_ids, user_len) for _ in range(num_turns)]
        for _ in range(num_conversations)
    ]
    gaps = max(num_turns - 1, 0)
    if think_time_dist == "constant":
        thinks = [(float(think_time_s),) * gaps for _ in range(num_conversations)]
    elif think_time_dist == "exponential":  # drawn after the messages: same seed, same words
        drawn = rng.exponential(think_time_s, size=(num_conversations, gaps))
        thinks = [tuple(float(t) for t in row) for row in drawn]
    else:
        raise ValueError(f"unknown think time distribution {think_time_dist!r}")
    return [
        ConversationPlan(
            index=i,
            system_ids=system_ids,
            user_ids=users[i],
            output_len=output_len,
            start_s=i * stagger_s,
            think_s=thinks[i],
        )
        for i in range(num_conversations)
    ]


def first_prompt(plan: ConversationPlan) -> list[int]:
    return plan.system_ids + plan.user_ids[0]


def next_prompt(previous_prompt: Sequence[int], answer_ids: Sequence[int], user_ids: Sequence[int]) -> list[int]:  # fmt: skip
    """The next turn's prompt: the history so far, the answer as returned, the new message."""
    return [*previous_prompt, *answer_ids, *user_ids]


@dataclass(frozen=True)
class TurnRef:
    """Where a request sits in the workload: which conversation, which turn (1-based)."""

    conversation: int
    turn: int
    request_index: int


def turn_groups(refs: Sequence[TurnRef], num_turns: int) -> dict[str, list[int]]:
    """Request indices per turn group: "1" .. "T" and "2+" (every turn after the first)."""
    groups: dict[str, list[int]] = {str(t): [] for t in range(1, num_turns + 1)}
    groups["2+"] = []
    for ref in refs:
        groups[str(ref.turn)].append(ref.request_index)
        if ref.turn >= 2:
            groups["2+"].append(ref.request_index)
    return groups


def conversation_indices(refs: Sequence[TurnRef]) -> list[dict[str, Any]]:
    """Each conversation's request indices in turn order (how a result file records it)."""
    by_conversation: dict[int, list[TurnRef]] = {}
    for ref in refs:
        by_conversation.setdefault(ref.conversation, []).append(ref)
    return [
        {
            "conversation": c,
            "request_indices": [r.request_index for r in sorted(rs, key=lambda r: r.turn)],
        }  # fmt: skip
        for c, rs in sorted(by_conversation.items())
    ]


def cached_share(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Prompt tokens the server says it served from its cache, over the completed requests'
    prompt tokens. `cached_tokens_reported` is False when some answer carried no count."""
    done = [r for r in records if r.ok]
    cached = sum(r.cached_tokens or 0 for r in done)
    prompt = sum(r.prompt_len for r in done)
    return {
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "cached_token_share": cached / prompt if prompt else 0.0,
        "cached_tokens_reported": all(r.cached_tokens is not None for r in done),
    }


def turn_figures(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Latency statistics (TTFT, TPOT, ITL, E2E) and cached share of one turn group."""
    done = [r for r in records if r.ok]
    out: dict[str, Any] = {"num_requests": len(records), "completed": len(done)}
    for name, values in latency_samples(records).items():
        out.update(latency_stats(name, values))
    out.update(cached_share(records))
    return out


def per_turn_figures(
    records: Sequence[RequestRecord], refs: Sequence[TurnRef], num_turns: int
) -> dict[str, dict[str, Any]]:
    return {
        group: turn_figures([records[i] for i in indices])
        for group, indices in turn_groups(refs, num_turns).items()
    }
