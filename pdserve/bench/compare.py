"""`pdserve bench compare A.json B.json`: two (or more) runs side by side, as a table with
each run's ratio to the first, and as overlaid latency CDFs; multi-turn runs also get their
per-turn figures and whether their answers were the same tokens. Runs in the client; files only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from pdserve.bench.metrics import LATENCIES, PERCENTILES

SUMMARY_FIELDS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "goodput_share",
    "request_goodput",
]
LATENCY_FIELDS = [
    f"{stat}_{name}_ms"
    for name in LATENCIES
    for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES))
]


def load_run(path: str) -> tuple[str, dict[str, Any]]:
    """(label, result): the run's own label, else its file name without `.json`."""
    with open(path, encoding="utf-8") as f:
        try:
            result = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
    if isinstance(result, dict) and "best_rate" in result and "runs" in result:
        raise ValueError(
            f"{path} is a --sweep-rates summary: compare the runs it saved beside it "
            "(<name>.rate-<r>.json)"
        )
    if not isinstance(result, dict) or "completed" not in result:
        raise ValueError(f"{path} is not a pdserve bench result (no 'completed' field)")
    return result.get("label") or os.path.splitext(os.path.basename(path))[0], result


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio(value: Any, base: Any) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, base))
    if not numbers or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def compare_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """Header, then one row per figure: name, each run's value, and each later run's ratio
    to the first run."""
    labels = [label for label, _ in runs]
    header = ["metric", *labels, *(f"{lab}/{labels[0]}" for lab in labels[1:])]
    rows = [header]
    base = runs[0][1]
    for name in SUMMARY_FIELDS + LATENCY_FIELDS:
        values = [result.get(name) for _, result in runs]
        ratios = [_ratio(v, base.get(name)) for v in values[1:]]
        rows.append([name, *(_cell(v) for v in values), *ratios])
    return rows


def _turn_value(result: dict[str, Any], group: str, name: str) -> Any:
    return (result.get("per_turn") or {}).get(group, {}).get(name)


def oracle_cached_share(result: dict[str, Any]) -> float | None:
    """The cached-token share a router that sends every turn where the previous one ran
    would get: a turn finds the previous turn's whole prompt (a prefill server caches
    prompts, not answers), a first turn the shared system prompt, except in the first
    conversation (nothing is cached yet). Over completed requests, as the measured share;
    None for a run that is not multi-turn."""
    conversations = result.get("conversations")
    system_len = (result.get("config") or {}).get("system_prompt_len")
    if not conversations or system_len is None:
        return None
    requests, oracle, prompt = result["requests"], 0, 0
    for conv in conversations:
        previous = system_len if conv["conversation"] else 0
        for index in conv["request_indices"]:
            record = requests[index]
            if record["ok"]:  # a turn after a failed one is not sent
                oracle += min(previous, record["prompt_len"] - 1)  # the last token is computed
                prompt += record["prompt_len"]
            previous = record["prompt_len"]
    return oracle / prompt if prompt else None


def multiturn_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """Per-turn TTFT p50 (turns 2+ first: the figure a prefix cache moves), cached share and
    KV bytes, each with its ratio to the first run; empty unless every run is multi-turn."""
    if not all(result.get("per_turn") for _, result in runs):
        return []
    base = runs[0][1]
    groups = ["2+", *(g for g in base["per_turn"] if g != "2+")]
    rows = []
    for group in groups:
        for stat in ("p50_ttft_ms", "p99_ttft_ms"):
            values = [_turn_value(result, group, stat) for _, result in runs]
            ratios = [_ratio(v, values[0]) for v in values[1:]]
            rows.append([f"turn {group} {stat}", *(_cell(v) for v in values), *ratios])
    for name in ("cached_token_share", "kv_transfer_bytes"):
        values = [result.get(name) for _, result in runs]
        ratios = [_ratio(v, values[0]) for v in values[1:]]
        rows.append([name, *(_cell(v) for v in values), *ratios])
    oracle = [oracle_cached_share(result) for _, result in runs]
    of_oracle = [_ratio(r.get("cached_token_share"), o) for (_, r), o in zip(runs, oracle, strict=True)]  # fmt: skip
    rows.append(["oracle_cached_share", *(_cell(v) for v in oracle), *[""] * (len(runs) - 1)])
    rows.append(["cached_share_of_oracle", *of_oracle, *[""] * (len(runs) - 1)])
    return rows


def _answer(result: dict[str, Any], index: int) -> list[int] | str | None:
    record = result["requests"][index]
    if not record.get("ok"):
        return None
    ids = record.get("output_ids")
    return ids if ids is not None else record.get("output_text")


def _first_difference(a: list[int] | str, b: list[int] | str) -> int:
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return min(len(a), len(b))


def top2_gap(result: dict[str, Any], index: int, position: int | None) -> float | None:
    """The gap between the two best logprobs (= between the two best logits) where a
    request's answer reached `position`, when the run recorded top logprobs."""
    tops = result["requests"][index].get("output_top_logprobs")
    if position is None or not tops or position >= len(tops) or not tops[position]:
        return None
    row = tops[position]
    return float(row[0][0] - row[1][0]) if len(row) >= 2 else None


def answer_divergences(base: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """Per conversation, the first turn whose answer differs between two multi-turn runs
    (later turns have other prompts from there on), with the first differing token position
    (or character, for text-only answers) and both runs' top-2 logprob gap there when they
    recorded top logprobs (a gap near 0 is a near-tie, where rounding may pick either token);
    a turn that failed in either run counts as differing with `position` None. Empty when
    every answer is the same."""
    out = []
    other_convs = {c["conversation"]: c for c in other.get("conversations") or []}
    for conv in base.get("conversations") or []:
        theirs = other_convs.get(conv["conversation"], {"request_indices": []})["request_indices"]
        for turn, i in enumerate(conv["request_indices"], 1):
            # a turn the other run does not have (fewer conversations or turns) differs
            j = theirs[turn - 1] if turn <= len(theirs) else None
            a, b = _answer(base, i), None if j is None else _answer(other, j)
            if a is not None and a == b:
                continue
            position = None if a is None or b is None else _first_difference(a, b)
            gaps = [
                top2_gap(base, i, position),
                None if j is None else top2_gap(other, j, position),
            ]
            out.append(
                {"conversation": conv["conversation"], "turn": turn, "position": position,
                 "top2_logprob_gap": None if None in gaps else gaps}
            )  # fmt: skip
            break
    return out


def format_divergences(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    base_label, base = runs[0]
    num_conversations = len(base.get("conversations") or [])
    lines = []
    for label, result in runs[1:]:
        diffs = answer_divergences(base, result)
        if not diffs:
            lines.append(f"answers {label} vs {base_label}: identical ({num_conversations} conversations)")  # fmt: skip
            continue
        first = diffs[0]
        lines.append(
            f"answers {label} vs {base_label}: {len(diffs)} of {num_conversations} conversations "
            f"differ; first: conversation {first['conversation']} turn {first['turn']} "
            f"token {first['position']}"
        )
        for diff in diffs:
            if diff["top2_logprob_gap"] is not None:
                gap_base, gap_other = diff["top2_logprob_gap"]
                lines.append(
                    f"  conversation {diff['conversation']} turn {diff['turn']} token "
                    f"{diff['position']}: top-2 logprob gap {gap_base:.3g} / {gap_other:.3g}"
                )
    return lines


def format_compare(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    rows = compare_rows(runs) + multiturn_rows(runs)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("-" * len(lines[0]))
    if all(result.get("conversations") for _, result in runs):
        lines += format_divergences(runs)
    return "\n".join(lines)
