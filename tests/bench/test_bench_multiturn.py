"""The multi-turn workload's pure parts: the conversation plan, the next prompt, figures per
turn, the KV transfer summary from server counters, and comparing two runs' answers."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench import multiturn
from pdserve.bench.compare import answer_divergences, format_compare, oracle_cached_share
from pdserve.bench.metrics import RequestRecord
from pdserve.bench.multiturn import TurnRef
from pdserve.bench.server_stats import kv_transfer_summary

ALLOWED = list(range(10, 300))


def plans(seed: int = 0, stagger_s: float = 0.5):
    return multiturn.plan_conversations(
        np.random.default_rng(seed), ALLOWED, 3, 4, 20, 5, 7, stagger_s
    )


def test_conversations_share_the_system_prompt_and_nothing_else():
    made = plans()
    assert len(made) == 3 and all(p.num_turns == 4 for p in made)
    assert all(p.system_ids == made[0].system_ids and len(p.system_ids) == 20 for p in made)
    users = [tuple(u) for p in made for u in p.user_ids]
    assert all(len(u) == 5 for u in users) and len(set(users)) == len(users)
    assert [p.start_s for p in made] == [0.0, 0.5, 1.0]
    assert all(p.output_len == 7 for p in made)


def test_the_seed_fixes_the_plan():
    assert plans(1) == plans(1)
    assert plans(1)[0].user_ids != plans(2)[0].user_ids


def test_think_times_are_constant_or_drawn_from_the_seed_without_changing_the_words():
    def made(dist, seed=0):
        return multiturn.plan_conversations(
            np.random.default_rng(seed), ALLOWED, 50, 4, 20, 5, 7, 0.5, 2.0, dist
        )

    constant, drawn = made("constant"), made("exponential")
    assert all(p.think_s == (2.0, 2.0, 2.0) for p in constant)
    assert [p.user_ids for p in drawn] == [p.user_ids for p in constant]
    assert [p.system_ids for p in drawn] == [p.system_ids for p in constant]
    thinks = np.array([p.think_s for p in drawn])
    assert thinks.shape == (50, 3) and (thinks >= 0).all()
    assert len(set(thinks.ravel().tolist())) == thinks.size  # users drift apart
    assert 1.5 < thinks.mean() < 2.6  # mean 2 s (150 draws)
    assert made("exponential") == drawn and made("exponential", 1) != drawn
    assert drawn[0].think_after(1) == drawn[0].think_s[1] and drawn[0].think_after(3) == 0.0
    with pytest.raises(ValueError, match="think time"):
        made("gamma")


def test_next_prompt_is_the_history_then_the_answer_then_the_message():
    plan = plans()[0]
    prompt = multiturn.first_prompt(plan)
    assert prompt == plan.system_ids + plan.user_ids[0]
    answer = [7, 8, 9]
    following = multiturn.next_prompt(prompt, answer, plan.user_ids[1])
    assert following[: len(prompt)] == prompt
    assert following[len(prompt) :] == answer + plan.user_ids[1]


def record(index: int, ttft_s: float, prompt_len: int, cached: int | None, ok: bool = True):
    return RequestRecord(
        index, prompt_len, 2, 0.0, sent_s=0.0, ok=ok, ttft_s=ttft_s, itl_s=[0.001],
        e2el_s=ttft_s + 0.001, output_tokens=2, output_tokens_from_server=True,
        cached_tokens=cached,
    )  # fmt: skip


def test_figures_are_grouped_by_turn_index_and_turns_after_the_first():
    # two conversations of three turns; later turns are faster and mostly cached
    records = [
        record(0, 0.100, 100, 0), record(1, 0.020, 200, 150), record(2, 0.030, 300, 250),
        record(3, 0.120, 100, 0), record(4, 0.040, 200, 150), record(5, 0.010, 300, 250),
    ]  # fmt: skip
    refs = [TurnRef(c, t + 1, c * 3 + t) for c in range(2) for t in range(3)]
    figures = multiturn.per_turn_figures(records, refs, 3)
    assert list(figures) == ["1", "2", "3", "2+"]
    assert figures["1"]["p50_ttft_ms"] == pytest.approx(110.0)
    assert figures["2"]["p50_ttft_ms"] == pytest.approx(30.0)
    assert figures["2+"]["p50_ttft_ms"] == pytest.approx(25.0)
    assert figures["2+"]["completed"] == 4
    assert figures["1"]["cached_token_share"] == 0.0
    assert figures["2+"]["cached_token_share"] == pytest.approx(800 / 1000)
    share = multiturn.cached_share(records)
    assert (share["cached_tokens"], share["prompt_tokens"]) == (800, 1200)
    assert share["cached_tokens_reported"] is True


def test_cached_share_counts_completed_requests_and_notes_missing_counts():
    records = [record(0, 0.1, 100, None), record(1, 0.1, 100, 50), record(2, 0.1, 500, 400, False)]
    share = multiturn.cached_share(records)
    assert (share["cached_tokens"], share["prompt_tokens"]) == (50, 200)
    assert share["cached_tokens_reported"] is False


def metrics_text(mode: str, kv_bytes: float, cached: float, model: str | None = "m") -> str:
    """A server's /metrics as pdserve writes them: every series labelled `model_name`
    (model None: unlabelled, as pdserve wrote them before)."""
    only = f'{{model_name="{model}"}}' if model else ""
    last = f',model_name="{model}"' if model else ""
    return (
        "# TYPE pdserve_kv_transfer_bytes_total counter\n"
        f"pdserve_kv_transfer_bytes_total{only} {kv_bytes}\n"
        "# TYPE pdserve_cached_tokens_total counter\n"
        f"pdserve_cached_tokens_total{only} {cached}\n"
        "# TYPE pdserve_server_info gauge\n"
        f'pdserve_server_info{{mode="{mode}"{last}}} 1.0\n'
    )


@pytest.mark.parametrize("model", ["m", None])
def test_kv_bytes_on_the_wire_are_what_decode_received_not_both_sides_summed(model):
    """With the `model_name` label the summary read 0 bytes: it looked counters up by their
    bare name."""
    scrapes = {
        url: tuple(metrics_text(mode, kv, cached, model) for kv, cached in scrape)
        for url, mode, scrape in (
            ("http://p", "prefill", ((1000, 0), (5096, 30))),
            ("http://d0", "decode", ((0, 0), (3000, 64))),
            ("http://d1", "decode", ((10, 0), (1106, 0))),
        )
    }
    kv = kv_transfer_summary(scrapes)
    assert kv["kv_bytes_sent"] == 4096 and kv["kv_bytes_received"] == 4096
    assert kv["kv_transfer_bytes"] == 4096
    assert kv["server_cached_tokens"] == 94
    assert kv["servers"]["http://d0"] == {
        "mode": "decode", "kv_transfer_bytes": 3000, "cached_tokens": 64,
    }  # fmt: skip
    assert kv["complete"] is True


def test_kv_bytes_fall_back_to_what_prefill_sent_and_note_silent_servers():
    scrapes = {
        "http://p": (metrics_text("prefill", 0, 0), metrics_text("prefill", 2048, 0)),
        "http://gone": (None, None),
    }
    kv = kv_transfer_summary(scrapes)
    assert kv["kv_transfer_bytes"] == 2048
    assert kv["servers"]["http://gone"] is None and kv["complete"] is False


def multiturn_result(answers: list[list[list[int]]], ttft_2_s: float, kv_bytes: float) -> dict:
    """A result of len(answers) conversations whose turns answered `answers[c][t]`."""
    num_turns = len(answers[0])
    requests, conversations = [], []
    for c, turns in enumerate(answers):
        indices = []
        for ids in turns:
            indices.append(len(requests))
            requests.append({"ok": True, "output_ids": ids, "output_text": None})
        conversations.append({"conversation": c, "request_indices": indices})
    groups = [str(t) for t in range(1, num_turns + 1)] + ["2+"]
    per_turn = {g: {"p50_ttft_ms": 100.0 if g == "1" else ttft_2_s * 1e3, "p99_ttft_ms": 1.0} for g in groups}  # fmt: skip
    return {
        "completed": len(requests), "requests": requests, "conversations": conversations,
        "per_turn": per_turn, "cached_token_share": 0.5, "kv_transfer_bytes": kv_bytes,
    }  # fmt: skip


def test_compare_finds_identical_answers_and_the_ratios_that_matter():
    answers = [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [1, 1, 1]]]
    off = multiturn_result(answers, 0.100, 4000.0)
    on = multiturn_result(answers, 0.020, 1000.0)
    assert answer_divergences(off, on) == []
    text = format_compare([("off", off), ("on", on)])
    assert "answers on vs off: identical (2 conversations)" in text
    row = next(line for line in text.splitlines() if line.startswith("turn 2+ p50_ttft_ms"))
    assert row.split()[-1] == "0.20x"
    row = next(line for line in text.splitlines() if line.startswith("kv_transfer_bytes"))
    assert row.split()[-1] == "0.25x"


def test_compare_names_the_first_differing_turn_and_token():
    base = multiturn_result([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [1, 1, 1]]], 0.1, 1.0)
    other = multiturn_result([[[1, 2, 3], [4, 9, 6]], [[7, 8, 9], [1, 1, 1]]], 0.1, 1.0)
    assert answer_divergences(base, other) == [
        {"conversation": 0, "turn": 2, "position": 1, "top2_logprob_gap": None}
    ]
    other["requests"][2]["ok"] = False  # conversation 1's first turn failed
    diffs = answer_divergences(base, other)
    assert diffs[1] == {"conversation": 1, "turn": 1, "position": None, "top2_logprob_gap": None}
    text = format_compare([("a", base), ("b", other)])
    assert "2 of 2 conversations differ; first: conversation 0 turn 2 token 1" in text


def test_turns_or_conversations_the_other_run_lacks_are_not_called_identical():
    """Runs of other shapes were compared on their common turns only: "identical" for a
    run that had one conversation of two, or one turn of two."""
    base = multiturn_result([[[1], [2]], [[3], [4]]], 0.1, 1.0)
    fewer_conversations = multiturn_result([[[1], [2]]], 0.1, 1.0)
    assert answer_divergences(base, fewer_conversations) == [
        {"conversation": 1, "turn": 1, "position": None, "top2_logprob_gap": None}
    ]
    fewer_turns = multiturn_result([[[1]], [[3]]], 0.1, 1.0)
    assert [d["turn"] for d in answer_divergences(base, fewer_turns)] == [2, 2]


def test_a_divergence_shows_the_top2_logprob_gap_where_both_runs_recorded_it():
    base = multiturn_result([[[1, 2, 3]]], 0.1, 1.0)
    other = multiturn_result([[[1, 4, 3]]], 0.1, 1.0)
    for result, (best, second) in ((base, (2, 4)), (other, (4, 2))):
        rows = [[[-0.1, 1, None], [-3.0, 9, None]], [[-0.69310, best, None], [-0.69316, second, None]]]  # fmt: skip
        result["requests"][0]["output_top_logprobs"] = rows + [None]
    (diff,) = answer_divergences(base, other)
    assert diff["position"] == 1
    assert diff["top2_logprob_gap"] == pytest.approx([6e-5, 6e-5])
    assert "top-2 logprob gap 6e-05 / 6e-05" in format_compare([("a", base), ("b", other)])


def test_the_oracle_finds_the_previous_prompt_and_the_system_prompt_after_the_first_conversation():
    result = multiturn_result([[[1], [2], [3]], [[4], [5], [6]]], 0.1, 1.0)
    for n, request in enumerate(result["requests"]):
        request["prompt_len"] = [120, 200, 280][n % 3]
    assert oracle_cached_share(result) is None  # no system prompt length recorded
    result["config"] = {"system_prompt_len": 100}
    # conversation 0: 0 + 120 + 200; conversation 1: 100 (the system prompt) + 120 + 200
    assert oracle_cached_share(result) == pytest.approx(740 / 1200)
    result["requests"][5]["ok"] = False  # not sent: neither its prompt nor its match counts
    assert oracle_cached_share(result) == pytest.approx(540 / 920)
    result["cached_token_share"] = 0.5
    text = format_compare([("a", result), ("b", result)])
    row = next(line for line in text.splitlines() if line.startswith("cached_share_of_oracle"))
    assert row.split()[1:] == [f"{0.5 / (540 / 920):.2f}x"] * 2
