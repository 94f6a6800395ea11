"""`pdserve bench` against a scripted OpenAI-compatible server (tests/bench/scripted_server.py):
token counts, failures and every latency figure are checked against what the script sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from pdserve.bench import client, driver, runner
from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import summarize
from pdserve.bench.report import build_result
from pdserve.bench.workload import Prompt
from tests.bench.scripted_server import Script, ScriptedServer, serving

FIRST_S, GAP_S = 0.05, 0.01


def send(server: ScriptedServer, names: list[str], max_concurrency: int | None = None):
    """Send one request per script name; (records, duration)."""

    async def go():
        async with serving(server) as url, aiohttp.ClientSession() as session:
            target = runner.Target(url, "completions", "scripted", 0.0, True, None, 30.0)
            prompts = [Prompt([1], 8, text=name) for name in names]
            return await runner.send_all(
                session, target, prompts, [0.0] * len(prompts), max_concurrency
            )

    return asyncio.run(go())


def strict_json(result: dict) -> dict:
    return json.loads(json.dumps(result, allow_nan=False))


def percentile_ms(values_s: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks, computed here by hand."""
    xs = sorted(v * 1e3 for v in values_s)
    rank = (len(xs) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


def test_counts_and_latencies_follow_what_the_server_sent():
    timed = {"first_delay_s": FIRST_S, "gap_s": GAP_S}
    server = ScriptedServer(
        scripts={
            "five": Script(tokens=tuple("abcde"), usage_tokens=5, **timed),
            "no-usage": Script(tokens=tuple("xyz"), usage_tokens=None, **timed),
            "one": Script(tokens=("a",), usage_tokens=1, **timed),
            # asked for 8, stopped after 2 (a server that does not honour ignore_eos)
            "early": Script(tokens=("a", "b"), usage_tokens=2, finish="stop", **timed),
        }
    )
    names = ["five", "no-usage", "one", "early"]
    records, duration_s = send(server, names, max_concurrency=8)
    summary = summarize(records, duration_s)
    result = strict_json(build_result(BenchConfig(), 1.0, summary, records, {}, None))
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["output_lens"] == [5, 3, 1, 2]
    assert result["total_output_tokens"] == 11 and result["total_input_tokens"] == 4 * 3 + 1
    assert [len(gaps) for gaps in result["itls"]] == [4, 2, 0, 1]
    assert result["output_tokens_from_server"] is False  # "no-usage" counted its chunks
    for record, want_tokens in zip(result["requests"], [5, 3, 1, 2], strict=True):
        assert record["ttft_s"] >= FIRST_S
        assert record["e2el_s"] >= FIRST_S + (want_tokens - 1) * GAP_S
        assert sum(record["itl_s"]) <= record["e2el_s"] - record["ttft_s"]
        if want_tokens > 1:
            want = (record["e2el_s"] - record["ttft_s"]) / (want_tokens - 1)
            assert record["tpot_s"] == pytest.approx(want)
        else:
            assert record["tpot_s"] is None
    samples = {
        "ttft": [r["ttft_s"] for r in result["requests"]],
        "e2el": [r["e2el_s"] for r in result["requests"]],
        "itl": [gap for r in result["requests"] for gap in r["itl_s"]],
        "tpot": [r["tpot_s"] for r in result["requests"] if r["tpot_s"] is not None],
    }
    for name, values in samples.items():
        assert result[f"mean_{name}_ms"] == pytest.approx(1e3 * sum(values) / len(values))
        for p in (50, 90, 99):
            assert result[f"p{p}_{name}_ms"] == pytest.approx(percentile_ms(values, p))
        assert result[f"std_{name}_ms"] == pytest.approx(1e3 * float(np.std(values)))
    assert result["request_throughput"] == pytest.approx(4 / duration_s)
    assert result["output_throughput"] == pytest.approx(11 / duration_s)


def test_failures_are_counted_by_reason_and_left_out_of_the_figures():
    server = ScriptedServer(
        scripts={
            "500": Script(status=500),
            "429": Script(status=429),
            "cut": Script(tokens=tuple("abcd"), cut_after=2),
            "error": Script(tokens=tuple("abcd"), error_after=1),
            "ok": Script(tokens=("a", "b"), usage_tokens=2),
        }
    )
    records, duration_s = send(server, ["500", "429", "cut", "error", "ok"])
    summary = summarize(records, duration_s)
    assert summary["failed_by_reason"] == {
        "http_500": 1, "http_429": 1, "connection": 1, "stream_error": 1,
    }  # fmt: skip
    assert summary["completed"] == 1 and summary["total_output_tokens"] == 2
    assert sum(len(r.itl_s) for r in records if r.ok) == 1
    assert records[3].error == "scripted error"


def test_an_answer_whose_only_token_has_no_text_is_complete():
    """vLLM and SGLang stream an answer that is EOS alone as one chunk with empty text and a
    finish reason; the bench failed it as `incomplete_stream`."""
    server = ScriptedServer(scripts={"eos": Script(tokens=("",), usage_tokens=1, finish="stop")})
    records, duration_s = send(server, ["eos", "eos"])
    result = strict_json(
        build_result(BenchConfig(), 1.0, summarize(records, duration_s), records, {}, None)
    )
    assert (result["completed"], result["failed"]) == (2, 0)
    assert result["output_lens"] == [1, 1] and result["itls"] == [[], []]
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] is None
    assert result["mean_itl_ms"] is None


def test_every_token_chunk_counts_also_when_its_text_is_held_back():
    server = ScriptedServer(default=Script(tokens=("", "a", "", "b"), usage_tokens=4))
    records, _ = send(server, ["x"])
    assert records[0].ok and len(records[0].itl_s) == 3  # the first chunk gave the TTFT
    assert records[0].output_text == "ab"


def test_a_last_line_without_a_newline_still_counts():
    """A body ending in `data: [DONE]` with no newline lost that line: an answer that gave
    no finish reason failed as incomplete_stream."""
    server = ScriptedServer(default=Script(finish=None, done_newline=False))
    records, _ = send(server, ["a"])
    assert records[0].ok, records[0].error
    assert records[0].output_tokens == 3


def test_warmup_is_sent_first_and_left_out_of_the_run(tokenizer_dir: str, tmp_path: Path):
    server = ScriptedServer(default=Script(tokens=("a", "b"), usage_tokens=2))
    out = tmp_path / "run.json"

    async def go():
        async with serving(server) as url:
            cfg = BenchConfig(
                base_url=url, endpoint="completions", tokenizer=tokenizer_dir, num_prompts=3,
                warmup_requests=2, max_concurrency=16, random_input_len=8, random_output_len=2,
                request_rate=50.0, output=str(out), progress=False,
            )  # fmt: skip
            return await driver.run_single(cfg)

    asyncio.run(go())
    result = json.loads(out.read_text(), parse_constant=pytest.fail)
    assert len(server.prompts_seen) == 5
    assert result["completed"] == 3 and result["num_requests"] == 3
    assert result["total_output_tokens"] == 6
    sent = [r["sent_s"] for r in result["requests"]]
    assert all(r["sent_s"] >= r["scheduled_s"] for r in result["requests"])
    assert sent == sorted(sent) and sent[0] < 0.05  # the first goes at once


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        ({"data": [{"id": "scripted"}, {"id": "other"}]}, "scripted"),
        ({"data": [{"object": "model"}]}, None),  # no id: it sent "None" as the model
        ({"data": [{"id": None}]}, None),
        ({"data": ["scripted"]}, None),  # not an object: AttributeError
        ({"data": []}, None),
        ({"object": "list"}, None),
        (["scripted"], None),
    ],
)
def test_the_served_model_is_the_first_listed_id_or_none(listing, expected):
    async def go():
        server = ScriptedServer(models_listing=listing)
        async with serving(server) as url, aiohttp.ClientSession() as session:
            return await client.served_model_name(session, url)

    assert asyncio.run(go()) == expected
