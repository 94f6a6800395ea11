"""Conditional disaggregation with a DP 2 decode server and no --dp-aware: a request sent
to decode alone goes to the rank that holds its prompt (its answer shows the prompt cached),
not wherever the server's own DP controller would put it."""

from __future__ import annotations

import pytest

from tests.disagg.conftest import PDFactory
from tests.router.conftest import router_args, start_router
from tests.router.test_router_kv_aware import PAGE, generate, prompt, wait_router_caught_up
from tests.router.test_router_local_prefill import paths

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    factory = PDFactory()
    try:
        prefill, decode = factory.prefill(1), factory.decode(2)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
        policy = ["--policy", "kv_aware", "--local-prefill-threshold", "32"]
        with start_router([*args, *policy]) as router:
            yield prefill, decode, router
    finally:
        factory.stop_all()


def test_a_local_request_goes_to_the_decode_rank_that_holds_its_prompt(cluster):
    prefill, decode, router = cluster
    urls = [prefill.url, decode.url]
    wait_router_caught_up(router.url, urls)
    first = generate(router.url, prompt(0, 0))
    assert paths(router.url) == {"disaggregated": 1, "local": 0}
    wait_router_caught_up(router.url, urls)  # one decode rank holds the prompt now
    for turn in range(1, 3):  # the server's round robin alone would move the second
        again = generate(router.url, prompt(0, 0))
        assert paths(router.url) == {"disaggregated": 1, "local": turn}
        assert again["output_ids"] == first["output_ids"]
        assert again["meta_info"]["cached_tokens"] == 4 * PAGE, turn
