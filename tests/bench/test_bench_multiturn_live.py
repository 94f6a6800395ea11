"""The multi-turn workload against a real colocated tiny-random server: each turn's prompt
extends the last one with the answer the server returned, conversations run at once with
their think time, the report is per turn, and two runs' answers can be compared."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import aiohttp
import pytest

from pdserve.bench import conversations, driver, runner
from pdserve.bench.compare import answer_divergences, format_compare
from pdserve.bench.config import BenchConfig
from pdserve.bench.workload import Prompt

TURN_FIGURES = ["completed", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p90_e2el_ms",
                "cached_tokens", "prompt_tokens", "cached_token_share"]  # fmt: skip


def small_config(url: str, **overrides) -> BenchConfig:
    values = dict(
        base_url=url, dataset_name="multiturn", num_conversations=3, num_turns=3,
        system_prompt_len=24, user_len=5, random_output_len=4, think_time_s=0.3,
        conversation_stagger_s=0.05, progress=False, request_timeout_s=60.0,
    )  # fmt: skip
    values.update(overrides)
    return BenchConfig(**values)


@dataclasses.dataclass(frozen=True)
class WatchedTarget(runner.Target):
    """The real target, noting every prompt it was asked to send."""

    sent: list = dataclasses.field(default_factory=list)

    def body(self, prompt: Prompt) -> dict:
        self.sent.append(list(prompt.input_ids))
        return super().body(prompt)


def test_each_turn_extends_the_last_prompt_with_the_answer_returned(tiny_server):
    cfg = small_config(tiny_server.url)
    tokenizer = runner.load_tokenizer(runner.resolve_tokenizer_path("tiny-random", None))
    plans = conversations.build_plans(cfg, tokenizer)
    target = WatchedTarget(tiny_server.url, "generate", None, 0.0, True, None, 60.0)

    async def go():
        async with aiohttp.ClientSession() as session:
            return await conversations.send_conversations(session, target, plans)

    records, refs, _ = asyncio.run(go())
    assert all(r.ok and len(r.output_ids) == 4 for r in records)
    for plan in plans:
        head = plan.system_ids + plan.user_ids[0]
        prompts = [p for p in target.sent if p[: len(head)] == head]  # in the order sent
        assert len(prompts) == 3 and prompts[0] == head
        for turn in range(1, 3):
            previous, answer = prompts[turn - 1], records[plan.index * 3 + turn - 1].output_ids
            assert prompts[turn] == previous + answer + plan.user_ids[turn]
            assert records[plan.index * 3 + turn].prompt_len == len(prompts[turn])  # server's count
    assert [(r.conversation, r.turn) for r in refs[:4]] == [(0, 1), (0, 2), (0, 3), (1, 1)]


@pytest.mark.parametrize("dist", ["constant", "exponential"])
def test_conversations_interleave_and_keep_their_think_time(tiny_server, dist):
    cfg = small_config(tiny_server.url, think_time_dist=dist)
    tokenizer = runner.load_tokenizer(runner.resolve_tokenizer_path("tiny-random", None))
    plans = conversations.build_plans(cfg, tokenizer)  # the seed fixes the think times
    thinks = [plan.think_s for plan in plans]
    assert all(t == (0.3, 0.3) for t in thinks) == (dist == "constant")
    result = asyncio.run(driver.run_multiturn(cfg))
    requests = result["requests"]
    for conv in result["conversations"]:
        turns = [requests[i] for i in conv["request_indices"]]
        assert turns[0]["scheduled_s"] == conv["conversation"] * 0.05
        assert turns[0]["sent_s"] >= turns[0]["scheduled_s"]
        for turn, (before, after) in enumerate(zip(turns, turns[1:], strict=False)):
            answered_s = before["sent_s"] + before["e2el_s"]
            think_s = thinks[conv["conversation"]][turn]
            assert after["scheduled_s"] >= answered_s + think_s
            assert after["sent_s"] >= after["scheduled_s"] - 0.005
    # every conversation started before the first one ended: they ran at once
    first = [requests[i] for i in result["conversations"][0]["request_indices"]]
    first_done_s = first[-1]["sent_s"] + first[-1]["e2el_s"]
    starts = [requests[c["request_indices"][0]]["sent_s"] for c in result["conversations"]]
    assert max(starts) < first_done_s


def test_the_result_reports_each_turn_the_cache_share_and_kv_bytes(tiny_server, tmp_path, capsys):
    out = tmp_path / "run.json"
    cfg = small_config(
        tiny_server.url, output=str(out), metrics_urls=[tiny_server.url], warmup_requests=1,
        plot_dir=str(tmp_path / "plots"),
    )  # fmt: skip
    asyncio.run(driver.run_multiturn(cfg))
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"], result["num_requests"]) == (9, 0, 9)
    assert list(result["per_turn"]) == ["1", "2", "3", "2+"]
    for group, figures in result["per_turn"].items():
        assert figures["completed"] == (6 if group == "2+" else 3)
        for name in TURN_FIGURES:
            assert figures[name] is not None, (group, name)
    records = result["requests"]
    assert result["cached_tokens_reported"] is True
    assert result["cached_tokens"] == sum(r["cached_tokens"] for r in records)
    assert result["prompt_tokens"] == sum(r["prompt_len"] for r in records)
    assert result["cached_token_share"] == result["cached_tokens"] / result["prompt_tokens"]
    assert all(len(r["output_ids"]) == 4 and r["output_text"] is not None for r in records)
    kv = result["kv_transfer"]
    assert kv["servers"][tiny_server.url]["mode"] == "colocated"
    assert result["kv_transfer_bytes"] == 0 and kv["complete"] is True  # nothing moves colocated
    assert result["disagg_stages"] == {}  # read from the same scrapes; colocated times no stage
    assert result["config"]["num_turns"] == 3 and result["warmup_requests"] == 1
    assert (tmp_path / "plots" / "ttft_by_turn.png").stat().st_size > 5000
    assert "Per turn" in printed and "2+" in printed and "KV bytes transferred" in printed


def test_compare_tells_identical_answers_from_different_ones(tiny_server, tmp_path: Path):
    runs = []
    for name, output_len in (("a", 4), ("b", 4), ("c", 3)):
        cfg = small_config(tiny_server.url, random_output_len=output_len, think_time_s=0.0)
        runs.append((name, asyncio.run(driver.run_multiturn(cfg))))
    (_, a), (_, b), (_, c) = runs
    assert answer_divergences(a, b) == []  # greedy: the same seed gives the same tokens
    # 3-token answers are the first 3 of the 4-token ones: turn 1 differs at token 3
    assert answer_divergences(a, c)[0] == {
        "conversation": 0, "turn": 1, "position": 3, "top2_logprob_gap": None,
    }  # fmt: skip
    text = format_compare(runs)
    assert "answers b vs a: identical (3 conversations)" in text
    assert "answers c vs a: 3 of 3 conversations differ" in text


def test_top_logprobs_asked_for_are_kept_per_answer_token(tiny_server):
    extra = json.dumps({"return_logprob": True, "top_logprobs_num": 2})
    cfg = small_config(tiny_server.url, num_conversations=1, think_time_s=0.0, extra_body=extra)
    result = asyncio.run(driver.run_multiturn(cfg))
    for record in result["requests"]:
        tops = record["output_top_logprobs"]
        assert len(tops) == 4 and all(len(row) == 2 and row[0][0] >= row[1][0] for row in tops)
        assert [row[0][1] for row in tops] == record["output_ids"]  # greedy takes the best


def test_a_failed_turn_ends_its_conversation_with_the_reason(tiny_server):
    cfg = small_config(tiny_server.url, system_prompt_len=5000, think_time_s=0.0)
    result = asyncio.run(driver.run_multiturn(cfg))
    assert result["completed"] == 0
    assert result["failed_by_reason"] == {"http_400": 3, "previous_turn_failed": 6}
    assert result["per_turn"]["2+"]["completed"] == 0
