"""Through prefill -> decode, tokens equal the colocated server's: greedy and seeded
sampling, penalties, prompts shorter than a page, exactly a page and many pages, several
DP shapes. Tests of one configuration share its pair (`pd_pairs`): each leaves it idle."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.disagg.conftest import NIXL, backend_args
from tests.disagg.pd_driver import (
    get_load,
    pages_in_use,
    pd_generate,
    pd_generate_async,
    run_many,
    wait_idle,
)
from tests.disagg.test_pd_faults import _leg, _post_async
from tests.helpers import wait_until

PAGE_SIZE = 16  # the default --page-size
LENGTHS = [
    1,
    2,
    5,
    9,
    15,
    PAGE_SIZE,
    PAGE_SIZE + 1,
    2 * PAGE_SIZE - 1,
    2 * PAGE_SIZE,
    3 * PAGE_SIZE + 7,
    64,
    100,
    129,
    200,
    257,
]
ZMQ = backend_args("zmq")  # the default backend, named so that the shared pairs' keys match


def _prompts(num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(num)]
    return [[rng.randrange(3, 250) for _ in range(n)] for n in lengths]


def _bodies() -> list[dict]:
    bodies = [
        {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
        for ids in _prompts(45, seed=1)
    ]
    bodies += [
        {
            "input_ids": ids,
            "sampling_params": {
                "max_new_tokens": 6,
                "temperature": 0.9,
                "top_p": 0.95,
                "seed": 100 + i,
            },
        }
        for i, ids in enumerate(_prompts(10, seed=2))
    ]
    # Penalized greedy (prefill samples token 0 under the prompt's repetition penalty; decode
    # counts it among the output): tiny-random repeats itself only after ~17 tokens.
    penalized = [10 + (i * 13) % 450 for i in range(20)]
    for penalties in (
        {"repetition_penalty": 0.3},
        {"repetition_penalty": 0.5},
        {"frequency_penalty": 2.0, "presence_penalty": 0.5},
    ):
        params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True, **penalties}
        bodies.append({"input_ids": penalized, "sampling_params": params})
    bodies.append(
        {
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 5, "temperature": 0},
        }
    )
    return bodies


@pytest.fixture(scope="module")
def reference(tiny_server) -> list[list[int]]:
    out = []
    for body in _bodies():
        resp = requests.post(tiny_server.url + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        out.append(resp.json()["output_ids"])
    return out


def _with_nixl(dp: tuple[int, int]):
    return pytest.param(*dp, NIXL.values[0], [], marks=NIXL.marks, id=f"{dp[0]}-{dp[1]}-nixl")


@pytest.mark.parametrize(
    "prefill_dp,decode_dp,backend,decode_args",
    [
        pytest.param(1, 1, "zmq", [], id="1-1"),
        pytest.param(2, 2, "zmq", [], id="2-2"),
        pytest.param(3, 1, "zmq", [], id="3-1"),
        pytest.param(1, 1, "zmq", ["--overlap-schedule", "on"], id="1-1-overlap"),
        _with_nixl((1, 1)),
        _with_nixl((2, 2)),
    ],
)
def test_pd_tokens_equal_colocated(
    pd_pairs, reference, prefill_dp, decode_dp, backend, decode_args
):
    """Decode with overlap scheduling too: steps launched before the previous one's tokens
    are read (the CPU runs that code without asynchrony)."""
    args = backend_args(backend)
    prefill, decode = pd_pairs.get(prefill_dp, decode_dp, args, [*decode_args, *args])
    bodies = _bodies()
    results = run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port
            )
            for body in bodies
        ]
    )
    for body, want, result in zip(bodies, reference, results, strict=True):
        assert result.prefill.ok, result.prefill.error
        assert result.decode.ok, result.decode.error
        assert result.decode.body["output_ids"] == want, body
        # prefill answers with the first token it sampled and shipped
        assert result.prefill.body["output_ids"] == want[:1]
    wait_idle([prefill.url, decode.url])


def test_pd_streaming_and_batch_match_colocated(pd_pairs, tiny_server):
    prefill, decode = pd_pairs.get(2, 2, ZMQ, ZMQ)
    ids = _prompts(3, seed=3)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    want = [
        o["output_ids"]
        for o in requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    ]
    rooms = [random.randrange(2**63) for _ in ids]
    result = run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port, room=rooms
            )
        ]
    )[0]
    assert result.decode.ok, result.decode.error
    assert [o["output_ids"] for o in result.decode.body] == want
    wait_idle([prefill.url, decode.url])


def _last_sse_json(text: str) -> dict:
    import json

    chunks = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert chunks and chunks[-1] == "[DONE]", text[-500:]
    return json.loads(chunks[-2])


def test_pd_streaming_matches_colocated(pd_pairs, tiny_server):
    prefill, decode = pd_pairs.get(1, 1, ZMQ, ZMQ)
    body = {
        "input_ids": _prompts(1, seed=4)[0],
        "sampling_params": {"max_new_tokens": 7, "temperature": 0},
    }
    want = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()["output_ids"]
    result = run_many(
        lambda s: [
            pd_generate_async(
                s,
                prefill.url,
                decode.url,
                dict(body, stream=True),
                bootstrap_port=prefill.bootstrap_port,
            )
        ]
    )[0]
    assert result.decode.ok, result.decode.error
    assert _last_sse_json(result.decode.body)["output_ids"] == want
    wait_idle([prefill.url, decode.url])


def test_a_stop_string_in_the_first_token_stops_the_answer_as_colocated(pd_pairs, tiny_server):
    """The first token is sampled on prefill; a stop string its text matches ends the
    answer on decode, as colocated. Prefill must still ship the KV: its leg is sent first and
    decode's only once prefill computed the prompt, the order in which prefill used to abort
    the room on the match and fail the decode leg with 'aborted on prefill'."""
    prefill, decode = pd_pairs.get(1, 1, ZMQ, ZMQ)
    text = {"text": "The capital of France is"}
    first = requests.post(
        tiny_server.url + "/generate",
        json=dict(text, sampling_params={"max_new_tokens": 1, "temperature": 0}),
        timeout=60,
    ).json()["text"]
    assert first.strip(), "the first token must have text to stop on"
    body = dict(text, sampling_params={"max_new_tokens": 8, "temperature": 0, "stop": [first]})
    want = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    assert want["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    leg = _leg(prefill.bootstrap_port, random.randrange(2**63), body)
    prefill_answer = _post_async(prefill.url, leg)
    # computed and holding its pages for decode's page list
    wait_until(lambda: pages_in_use(prefill.url) > 0, 30, "prefill to compute the prompt")
    answer = requests.post(decode.url + "/generate", json=leg, timeout=60)
    assert answer.status_code == 200, answer.text
    assert prefill_answer.result().status_code == 200, prefill_answer.result().text
    got = answer.json()
    assert (got["text"], got["output_ids"]) == (want["text"], want["output_ids"])
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    wait_idle([prefill.url, decode.url])


def test_a_logprobs_request_joining_a_penalized_one_on_an_overlapped_decode(pd_pairs, tiny_server):
    """A penalized request's ids on the device, made by a launched (overlapped) decode step,
    failed the batch (500) when a step sampled after run() instead, as one with a logprobs
    row does: the in-place append to an inference tensor outside inference mode."""
    prefill, decode = pd_pairs.get(1, 1, ZMQ, ["--overlap-schedule", "on", *ZMQ])
    penalized = {
        "input_ids": [10 + (i * 13) % 450 for i in range(20)],
        "sampling_params": {
            "max_new_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
            "frequency_penalty": 0.5,
        },
    }
    want = requests.post(tiny_server.url + "/generate", json=penalized, timeout=60).json()
    greedy = {"max_new_tokens": 4, "temperature": 0}
    logprobs = {"input_ids": [9, 10, 11], "return_logprob": True, "sampling_params": greedy}
    kw = {"bootstrap_port": prefill.bootstrap_port}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(pd_generate, prefill.url, decode.url, penalized, **kw)
        wait_until(lambda: get_load(decode.url)[0]["num_running_reqs"] == 1, 30, "decoding")
        joined = pd_generate(prefill.url, decode.url, logprobs, **kw)
        result = running.result(timeout=60)
    assert joined.decode.ok, joined.decode.error
    assert result.decode.ok, result.decode.error
    assert result.decode.body["output_ids"] == want["output_ids"]
    wait_idle([prefill.url, decode.url])
