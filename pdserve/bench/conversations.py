"""The multi-turn workload's asyncio shell: each conversation is one task sending its turns
in order (its planned think time after every answer), all conversations at once, so their turns
interleave as chat traffic does. Runs in the `pdserve bench` client; the plan and the
figures are pure, in `multiturn.py`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from pdserve.bench import client, multiturn, report, runner, textfit
from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import RequestRecord, summarize
from pdserve.bench.multiturn import ConversationPlan, TurnRef
from pdserve.bench.server_stats import counter_deltas, kv_transfer_summary, stage_summary
from pdserve.bench.workload import Prompt, random_prompts

SKIPPED = "previous_turn_failed"


@dataclass
class _Run:
    """State shared by the conversation tasks of one measured run."""

    session: aiohttp.ClientSession
    target: runner.Target
    start: float  # perf_counter at the start of the run
    records: list[RequestRecord]
    on_record: Callable[[RequestRecord], None] | None

    def now_s(self) -> float:
        return time.perf_counter() - self.start

    async def sleep_until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.now_s()))


def build_plans(cfg: BenchConfig, tokenizer: Any) -> list[ConversationPlan]:
    rng = np.random.default_rng(cfg.seed)
    allowed = textfit.allowed_token_ids(tokenizer)
    return multiturn.plan_conversations(
        rng, allowed, cfg.num_conversations, cfg.num_turns, cfg.system_prompt_len,
        cfg.user_len, cfg.random_output_len, cfg.conversation_stagger_s, cfg.think_time_s,
        cfg.think_time_dist,
    )  # fmt: skip


def warmup_prompts(cfg: BenchConfig, tokenizer: Any) -> list[Prompt]:
    """First-turn-sized prompts of fresh tokens: they warm the server, not its cache."""
    rng = np.random.default_rng([cfg.seed, 3])
    allowed = textfit.allowed_token_ids(tokenizer)
    input_lens = [cfg.system_prompt_len + cfg.user_len] * cfg.warmup_requests
    return random_prompts(rng, allowed, input_lens, [cfg.random_output_len] * len(input_lens))


async def _conversation(run: _Run, plan: ConversationPlan) -> None:
    """Send the turns of one conversation; once a turn fails the rest cannot be built and
    are recorded as failed with the reason `previous_turn_failed`."""
    first = plan.index * plan.num_turns
    scheduled_s = plan.start_s
    prompt = multiturn.first_prompt(plan)
    for turn in range(plan.num_turns):
        record = run.records[first + turn]
        record.prompt_len, record.scheduled_s = len(prompt), scheduled_s
        await run.sleep_until(scheduled_s)
        body = run.target.body(Prompt(prompt, plan.output_len))
        await client.send_request(
            run.session, run.target.url, run.target.endpoint, body, record, run.start,
            run.target.timeout_s,
        )  # fmt: skip
        if run.on_record is not None:
            run.on_record(record)
        if not record.ok or record.output_ids is None:
            _skip_rest(run, first + turn + 1, first + plan.num_turns, record)
            return
        if turn + 1 < plan.num_turns:
            prompt = multiturn.next_prompt(prompt, record.output_ids, plan.user_ids[turn + 1])
            scheduled_s = run.now_s() + plan.think_after(turn)


def _skip_rest(run: _Run, begin: int, end: int, failed: RequestRecord) -> None:
    reason = failed.error_kind or "no output_ids in the answer"
    for record in run.records[begin:end]:
        record.error_kind, record.error = SKIPPED, f"turn {failed.index} failed: {reason}"
        if run.on_record is not None:
            run.on_record(record)


async def send_conversations(
    session: aiohttp.ClientSession,
    target: runner.Target,
    plans: Sequence[ConversationPlan],
    on_record: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], list[TurnRef], float]:
    """Run every conversation; (records in conversation-major order, where each sits, the
    run's duration in seconds from the first send to the last answer)."""
    refs = [
        TurnRef(plan.index, turn + 1, plan.index * plan.num_turns + turn)
        for plan in plans
        for turn in range(plan.num_turns)
    ]
    records = [RequestRecord(ref.request_index, 0, plans[0].output_len, 0.0) for ref in refs]
    run = _Run(session, target, time.perf_counter(), records, on_record)
    await asyncio.gather(*(_conversation(run, plan) for plan in plans))
    return records, refs, run.now_s()


async def _scrape(
    session: aiohttp.ClientSession, urls: Sequence[str]
) -> list[tuple[str | None, str | None]]:
    return list(await asyncio.gather(*(client.fetch_text(session, u + "/metrics") for u in urls)))


async def scrape_all(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[str | None]:
    """Each server's /metrics text; one that does not answer is None, with a warning (its
    figures are left out of the result: the run is not thrown away for them)."""
    answers = await _scrape(session, urls)
    for url, (_, error) in zip(urls, answers, strict=True):
        if error is not None:
            print(
                f"pdserve bench: warning: --metrics-urls {url}: GET /metrics failed ({error}); "
                "its figures are left out",
                file=sys.stderr,
                flush=True,
            )
    return [text for text, _ in answers]


async def check_metrics_urls(session: aiohttp.ClientSession, urls: Sequence[str]) -> None:
    """Before any load is sent: every --metrics-urls server must answer /metrics, or the
    run would end without the figures it was given them for."""
    for url, (_, error) in zip(urls, await _scrape(session, urls), strict=True):
        if error is not None:
            raise RuntimeError(f"--metrics-urls {url}: GET /metrics failed ({error})")


async def measure_conversations(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    target: runner.Target,
    plans: Sequence[ConversationPlan],
    info: dict[str, Any],
    on_record: Callable[[RequestRecord], None] | None = None,
) -> dict[str, Any]:
    """One measured multi-turn run, with the target's and the given servers' counters read
    before and after; returns the full result (the usual figures plus the per-turn ones)."""
    servers = [u.rstrip("/") for u in cfg.metrics_urls]
    target_before = await client.get_text(session, target.base_url + "/metrics")
    servers_before = await scrape_all(session, servers)
    records, refs, duration_s = await send_conversations(session, target, plans, on_record)
    target_after = await client.get_text(session, target.base_url + "/metrics")
    servers_after = await scrape_all(session, servers)
    counters = None
    if target_before and target_after:
        counters = counter_deltas(target_before, target_after)
    summary = summarize(records, duration_s, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    result = report.build_result(cfg, cfg.request_rate, summary, records, info, counters)
    result["request_rate"] = None  # conversations pace themselves
    scrapes = dict(zip(servers, zip(servers_before, servers_after, strict=True), strict=True))
    kv = kv_transfer_summary(scrapes) if servers else None
    result.update(multiturn.cached_share(records))
    result["per_turn"] = multiturn.per_turn_figures(records, refs, cfg.num_turns)
    result["kv_transfer"] = kv
    result["kv_transfer_bytes"] = kv["kv_transfer_bytes"] if kv else None
    result["disagg_stages"] = stage_summary(scrapes) if servers else None
    result["conversations"] = multiturn.conversation_indices(refs)
    return result
