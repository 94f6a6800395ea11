"""Tokenizer discovery and workload assembly from the options (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.config import BenchConfig
from pdserve.bench.runner import build_workload, resolve_tokenizer_path, send_times


def test_an_explicit_tokenizer_dir_wins(tokenizer_dir: str):
    info = {"tokenizer_path": "/nowhere", "model_path": "/nowhere"}
    assert resolve_tokenizer_path(tokenizer_dir, info) == tokenizer_dir


def test_the_servers_local_tokenizer_path_is_used(tokenizer_dir: str):
    info = {"tokenizer_path": tokenizer_dir, "model_path": "tiny-random"}
    assert resolve_tokenizer_path(None, info) == tokenizer_dir


def test_a_pdserve_model_name_resolves_to_its_local_dir():
    path = resolve_tokenizer_path(None, {"tokenizer_path": None, "model_path": "tiny-random"})
    assert (Path(path) / "tokenizer.json").exists()


def test_an_explicit_non_local_name_is_left_to_transformers():
    assert resolve_tokenizer_path("org/some-model", None) == "org/some-model"


def test_no_local_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="pass --tokenizer"):
        resolve_tokenizer_path(None, {"tokenizer_path": "org/remote", "model_path": "org/remote"})


def test_warmup_prompts_match_the_first_lengths_with_fresh_tokens(tokenizer):
    cfg = BenchConfig(num_prompts=5, random_input_len=30, random_range_ratio=0.5, warmup_requests=2)
    prompts, trace_times, warmup = build_workload(cfg, tokenizer)
    assert trace_times is None and len(prompts) == 5 and len(warmup) == 2
    assert [p.input_len for p in warmup] == [p.input_len for p in prompts[:2]]
    assert all(w.input_ids != p.input_ids for w, p in zip(warmup, prompts, strict=False))


def test_more_warmups_than_prompts_are_all_sent(tokenizer):
    """--warmup-requests 5 with --num-prompts 2 sent 2 warmups, without a word."""
    cfg = BenchConfig(num_prompts=2, random_input_len=30, random_range_ratio=0.5, warmup_requests=5)
    prompts, _, warmup = build_workload(cfg, tokenizer)
    assert [p.input_len for p in warmup] == [p.input_len for p in prompts * 3][:5]
    assert all(p.text is None for p in prompts)  # generate sends ids


def test_text_endpoints_get_fitted_text(tokenizer):
    cfg = BenchConfig(endpoint="completions", num_prompts=3, random_input_len=25, warmup_requests=1)
    prompts, _, warmup = build_workload(cfg, tokenizer)
    assert all(len(tokenizer.encode(p.text)) == 25 for p in prompts + warmup)


def test_a_trace_workload_keeps_the_traces_times_and_scales_lengths(tokenizer, tmp_path: Path):
    trace = tmp_path / "t.jsonl"
    rows = [(0, 400, 40, [1, 2]), (500, 300, 20, [1])]
    trace.write_text("".join(
        json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": h}) + "\n"
        for t, i, o, h in rows
    ))  # fmt: skip
    cfg = BenchConfig(
        dataset_name="trace", trace_file=str(trace), trace_length_scale=0.1, trace_block_size=200,
    )  # fmt: skip
    prompts, trace_times, _ = build_workload(cfg, tokenizer)
    assert trace_times == [0.0, 0.5]
    assert [(p.input_len, p.output_len) for p in prompts] == [(40, 4), (30, 2)]
    assert prompts[0].input_ids[:20] == prompts[1].input_ids[:20]  # block 1 scaled to 20


def test_an_empty_trace_is_refused(tokenizer, tmp_path: Path):
    (tmp_path / "t.jsonl").write_text("\n")
    cfg = BenchConfig(dataset_name="trace", trace_file=str(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match="no requests"):
        build_workload(cfg, tokenizer)


def test_arrivals_repeat_for_the_same_seed():
    cfg = BenchConfig(seed=3)
    assert send_times(cfg, 10, 4.0) == send_times(cfg, 10, 4.0)
    assert send_times(cfg, 10, 4.0) != send_times(BenchConfig(seed=4), 10, 4.0)
