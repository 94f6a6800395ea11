"""The server adds nothing to the tokens: same ids as the engine driven directly, and seeded
sampling is reproducible through HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, SamplingParams
from tests.conftest import TINY_ARGS
from tests.helpers import http_json

PROMPTS = [[1, 2, 3, 4], [50, 60, 70], list(range(100, 140))]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_config(EngineConfig(model_path="tiny-random"))


def engine_tokens(engine: Engine, prompt: list[int], sampling: SamplingParams) -> list[int]:
    rid = f"direct-{len(prompt)}-{sampling.seed}"
    engine.add_request(Request(rid=rid, prompt_ids=list(prompt), sampling=sampling))
    tokens: list[int] = []
    for _ in range(10_000):
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            if out.finish_reason is not None:
                return tokens
    raise AssertionError("the engine never finished the request")


def server_tokens(url: str, prompt: list[int], params: dict) -> list[int]:
    status, out = http_json(
        "POST", f"{url}/generate", {"input_ids": prompt, "sampling_params": params}
    )
    assert status == 200, out
    return out["output_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_the_engine(tiny_server, engine, prompt):
    params = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    expected = engine_tokens(engine, prompt, SamplingParams(**params))
    assert server_tokens(tiny_server.url, prompt, params) == expected


def test_seeded_sampling_is_reproducible_and_matches_the_engine(tiny_server, engine):
    params = {
        "max_new_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "ignore_eos": True,
    }
    first = server_tokens(tiny_server.url, PROMPTS[0], params)
    assert server_tokens(tiny_server.url, PROMPTS[0], params) == first
    assert engine_tokens(engine, PROMPTS[0], SamplingParams(**params)) == first
    other = server_tokens(tiny_server.url, PROMPTS[0], {**params, "seed": 99})
    assert other != first


def test_a_server_with_overlap_scheduling_gives_the_engine_tokens(server_factory, engine):
    """Concurrent requests through a worker whose engine launches each decode step before
    reading the previous one's tokens (the CPU runs the same code, without asynchrony)."""
    server = server_factory([*TINY_ARGS, "--overlap-schedule", "on"])
    greedy = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    seeded = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    cases = [(p, greedy) for p in PROMPTS] + [(PROMPTS[0], seeded)]
    expected = [engine_tokens(engine, p, SamplingParams(**params)) for p, params in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda case: server_tokens(server.url, *case), cases))
    assert got == expected
