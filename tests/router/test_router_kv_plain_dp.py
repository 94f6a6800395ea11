"""kv_aware with --dp-aware in front of a plain (colocated) DP 2 server: the router names the
rank that holds the prompt in `routed_dp_rank`, so a repeated prompt finds its pages cached
(before, the chosen rank was never sent and the server's round robin moved every other
request to the rank that lacked them)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import launch_server
from tests.router.conftest import router_args, start_router
from tests.router.test_router_kv_aware import PAGE, generate, prompt, wait_router_caught_up

pytestmark = pytest.mark.timeout(300)


def test_a_repeated_prompt_goes_to_the_rank_that_holds_it():
    with launch_server([*TINY_ARGS, "--dp-size", "2"]) as server:
        args = [*router_args(workers=[server.url]), "--policy", "kv_aware", "--dp-aware"]
        with start_router(args) as router:
            first = generate(router.url, prompt(0, 0))
            wait_router_caught_up(router.url, [server.url])
            for turn in range(2):  # the server's round robin alone would move one of them
                again = generate(router.url, prompt(0, 0))
                assert again["output_ids"] == first["output_ids"]
                assert again["meta_info"]["cached_tokens"] == 4 * PAGE, turn
