"""Conditional disaggregation against real servers: once the decode server holds all but a
few tokens of a prompt, the router sends it there alone (`disagg_local_prefill`); the
answer has the disaggregated path's tokens at temperature 0 and no KV moves; with DP 2 on
decode (no --dp-aware) it goes to the rank that holds the prompt. Without the field a
decode server still requires the bootstrap fields."""

from __future__ import annotations

import contextlib

import pytest
import requests

from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import metric_value
from tests.router.conftest import router_args, start_router
from tests.router.test_router_kv_aware import (
    GREEDY,
    PAGE,
    generate,
    prompt,
    wait_router_caught_up,
)

pytestmark = pytest.mark.timeout(300)
KV_BYTES = "pdserve_kv_transfer_bytes_total"


@pytest.fixture(scope="module")
def factory():
    factory = PDFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def prefill(factory):
    """One prefill server for both clusters: what its cache holds does not decide the
    local path (decode's does), and a server start costs CI seconds."""
    return factory.prefill(1)


@contextlib.contextmanager
def local_cluster(factory, prefill, decode_dp: int):
    """`prefill`, one decode server of `decode_dp` ranks, a kv_aware router with local
    prefill (threshold 32 tokens) and no --dp-aware."""
    decode = factory.decode(decode_dp)
    args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
    policy = ["--policy", "kv_aware", "--local-prefill-threshold", "32"]
    with start_router([*args, *policy]) as router:
        yield prefill, decode, router


@pytest.fixture(scope="module")
def cluster(factory, prefill):
    with local_cluster(factory, prefill, 1) as parts:
        yield parts


@pytest.fixture(scope="module")
def cluster_dp2(factory, prefill):
    with local_cluster(factory, prefill, 2) as parts:
        yield parts


def paths(router_url: str) -> dict[str, float]:
    name = "pdserve_router_request_paths_total"
    return {p: metric_value(router_url, name, {"path": p}) for p in ("disaggregated", "local")}


def first_disaggregated(prefill, decode, router) -> dict:
    """The prompt's first request (nothing cached yet) goes both legs; returns its answer
    once the router's index holds decode's pages of it."""
    urls = [prefill.url, decode.url]
    wait_router_caught_up(router.url, urls)
    first = generate(router.url, prompt(0, 0))
    assert paths(router.url) == {"disaggregated": 1, "local": 0}
    wait_router_caught_up(router.url, urls)  # decode's cached pages are in the index
    return first


def test_local_prefill_gives_the_disaggregated_tokens_and_moves_no_kv(cluster):
    prefill, decode, router = cluster
    first = first_disaggregated(prefill, decode, router)
    kv_bytes = metric_value(decode.url, KV_BYTES)
    assert kv_bytes > 0
    again = generate(router.url, prompt(0, 0))
    assert paths(router.url) == {"disaggregated": 1, "local": 1}
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 4 * PAGE
    assert metric_value(decode.url, KV_BYTES) == kv_bytes


def test_a_decode_server_requires_bootstrap_fields_unless_local(cluster):
    _, decode, _ = cluster
    body = {"input_ids": prompt(1, 0), "sampling_params": {"max_new_tokens": 2}}
    resp = requests.post(f"{decode.url}/generate", json=body, timeout=60)
    assert resp.status_code == 400 and "bootstrap_room" in resp.text
    local = {**body, "disagg_local_prefill": True}
    resp = requests.post(f"{decode.url}/generate", json=local, timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["output_ids"]) == 2


def test_a_local_request_goes_to_the_decode_rank_that_holds_its_prompt(cluster_dp2):
    """Not wherever the server's own DP controller would put it."""
    prefill, decode, router = cluster_dp2
    first = first_disaggregated(prefill, decode, router)  # one decode rank holds it now
    for turn in range(1, 3):  # the server's round robin alone would move the second
        again = generate(router.url, prompt(0, 0))
        assert paths(router.url) == {"disaggregated": 1, "local": turn}
        assert again["output_ids"] == first["output_ids"]
        assert again["meta_info"]["cached_tokens"] == 4 * PAGE, turn


def test_a_batch_of_prompts_is_not_computed_on_decode_alone(cluster):
    """Only the first prompt is scored: decode holding it says nothing of the others (here
    a whole uncached one), so the batch takes both legs."""
    prefill, decode, router = cluster
    urls = [prefill.url, decode.url]
    wait_router_caught_up(router.url, urls)
    generate(router.url, prompt(2, 0))
    wait_router_caught_up(router.url, urls)
    before = paths(router.url)
    body = {"input_ids": [prompt(2, 0), prompt(3, 0)], "sampling_params": GREEDY}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert [len(item["output_ids"]) for item in resp.json()] == [4, 4]
    after = paths(router.url)
    assert after["local"] == before["local"]
    assert after["disaggregated"] == before["disaggregated"] + 1
