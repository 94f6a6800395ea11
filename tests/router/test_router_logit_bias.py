"""logit_bias through `pdserve router` in front of real prefill + decode servers (tiny-random,
decode with overlap scheduling): both legs get the bias, so the first token (sampled by
prefill) and the rest (decode) obey it; a bad bias keeps the worker's 400."""

from __future__ import annotations

import pytest
import requests

from tests.disagg.conftest import PDFactory
from tests.router.conftest import router_args, start_router

pytestmark = pytest.mark.timeout(300)

FORCED_ID = 308  # "ello"
PROMPT = [10 + (i * 13) % 450 for i in range(20)]
NUM_NEW = 6


@pytest.fixture(scope="module")
def router():
    factory = PDFactory()
    try:
        prefill = factory.prefill(1)
        decode = factory.decode(1, ["--overlap-schedule", "on"])
        prefills = [(prefill.url, prefill.bootstrap_port)]
        with start_router(router_args(prefills, [decode.url])) as r:
            yield r
    finally:
        factory.stop_all()


def generate(router, sampling: dict) -> list[int]:
    params = {"max_new_tokens": NUM_NEW, "ignore_eos": True, **sampling}
    body = {"input_ids": PROMPT, "sampling_params": params}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 9}])
def test_prefills_first_token_and_decodes_tokens_obey_the_bias(router, sampling):
    plain = generate(router, sampling)
    assert FORCED_ID not in plain
    forced = generate(router, {**sampling, "logit_bias": {str(FORCED_ID): 100}})
    assert forced == [FORCED_ID] * NUM_NEW
    banned = generate(router, {**sampling, "logit_bias": {str(plain[0]): -100}})
    assert banned[0] != plain[0] and plain[0] not in banned


def test_openai_routes_obey_the_bias_and_refuse_a_bad_one(router):
    body = {"prompt": PROMPT, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    body["logit_bias"] = {str(FORCED_ID): 100}
    resp = requests.post(f"{router.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == "ello" * NUM_NEW
    body["logit_bias"] = {"5": 101}
    resp = requests.post(f"{router.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "logit_bias" and "bias 101.0 for token 5" in error["message"]
