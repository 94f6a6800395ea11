"""PD with models other than tiny-random: tokens through prefill -> decode equal the colocated
server's for a random Qwen3-MoE, and for a Llama whose KV pages have another shape (head_dim
24 != hidden / heads, one KV head; pages of one token, two prefill DP workers); a decode
server whose model routes differently (same tensors, other norm_topk_prob) is refused by
the layout check instead of decoding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from tests.disagg.conftest import Prefill
from tests.disagg.pd_driver import pd_generate_async, run_many, wait_idle
from tests.disagg.test_pd_tokens import _bodies
from tests.engine.families import build_served


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return build_served(tmp_path_factory.mktemp("served-qwen3-moe"), "qwen3-moe")


@pytest.fixture(scope="module")
def moe_prefill(pd_module, moe_dir) -> Callable[[], Prefill]:
    """The Qwen3-MoE prefill server (DP 1), started when a test first asks for it and shared
    by both tests: each leaves it running and idle."""
    started: list[Prefill] = []

    def get() -> Prefill:
        if not started:
            started.append(pd_module.prefill(1, args=["--model-path", moe_dir]))
        assert started[0].server.alive()
        return started[0]

    return get


def _pd_results(prefill, decode, bodies: list[dict]):
    return run_many(
        lambda s: [
            pd_generate_async(
                s, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port
            )
            for body in bodies
        ]
    )


@pytest.mark.parametrize(
    ("family", "args", "prefill_dp"),
    [("qwen3-moe", [], 1), ("llama-odd-heads", ["--page-size", "1"], 2)],
)
def test_pd_tokens_equal_colocated_for_other_model_shapes(
    pd, server_factory, moe_dir, moe_prefill, tmp_path, family, args, prefill_dp
):
    model_dir = moe_dir if family == "qwen3-moe" else build_served(tmp_path, family)
    model = ["--model-path", model_dir, *args]
    colocated = server_factory(model)
    bodies = _bodies()[::3]  # greedy and seeded, short to multi-page prompts
    want = []
    for body in bodies:
        resp = requests.post(colocated.url + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        want.append(resp.json()["output_ids"])
    if family == "qwen3-moe":
        assert (prefill_dp, args) == (1, [])  # moe_prefill's configuration
        prefill = moe_prefill()
    else:
        prefill = pd.prefill(prefill_dp, args=model)
    decode = pd.decode(1, args=model)
    for body, expected, result in zip(
        bodies, want, _pd_results(prefill, decode, bodies), strict=True
    ):
        assert result.prefill.ok, result.prefill.error
        assert result.decode.ok, result.decode.error
        assert result.decode.body["output_ids"] == expected, body
    wait_idle([prefill.url, decode.url])


def test_decode_refuses_a_prefill_whose_moe_routing_differs(pd, tmp_path, moe_prefill):
    other = build_served(tmp_path, "qwen3-moe", norm_topk_prob=True)
    prefill = moe_prefill()
    decode = pd.decode(1, args=["--model-path", other])
    result = _pd_results(prefill, decode, _bodies()[:1])[0]
    assert not result.decode.ok
    assert "model_fingerprint" in result.decode.error
    wait_idle([prefill.url, decode.url])
