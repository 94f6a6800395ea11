"""A prefill server killed and started again on other KV event ports while the router never
saw it fail its health checks (a quick restart): the router finds its old events server
silent, follows the new one and rebuilds the index, instead of keeping the old one forever."""

from __future__ import annotations

import pytest
import requests

from tests.disagg.conftest import TINY, PDFactory
from tests.helpers import launch_server, wait_until
from tests.router.conftest import router_args, start_router
from tests.router.test_router_kv_aware import generate, prompt, server_seq, wait_router_caught_up

pytestmark = pytest.mark.timeout(300)
NEVER_OUT = ["--health-failure-threshold", "1000000"]  # a restart the checks never notice


def kv_index(router_url: str) -> dict:
    return requests.get(f"{router_url}/server_info", timeout=10).json()["kv_index"]


def test_a_quickly_restarted_server_is_followed_again():
    factory = PDFactory()
    try:
        old, decode = factory.prefill(1), factory.decode(1)
        args = router_args([(old.url, old.bootstrap_port)], [decode.url])
        with start_router([*args, "--policy", "kv_aware", *NEVER_OUT]) as router:
            generate(router.url, prompt(0, 0))
            wait_router_caught_up(router.url, [old.url, decode.url])
            assert sum(kv_index(router.url)[old.url]["num_cached_pages"].values()) > 0
            old.server.stop()
            argv = [*TINY, "--mode", "prefill", "--bootstrap-port", str(old.bootstrap_port)]
            port = int(old.url.rsplit(":", 1)[1])
            ready = [f"http://127.0.0.1:{old.bootstrap_port}/route"]
            new = launch_server(argv, port=port, extra_ready_urls=ready)
            factory.started.append(new)
            workers = requests.get(f"{router.url}/workers", timeout=10).json()["workers"]
            assert all(w["healthy"] for w in workers)

            def rebuilt() -> bool:
                entry = kv_index(router.url).get(new.url)
                fresh = entry is not None and entry["seq"] == server_seq(new.url)
                return fresh and sum(entry["num_cached_pages"].values()) == 0

            wait_until(rebuilt, 90, "the router to follow the restarted server's events")
            assert generate(router.url, prompt(0, 0))["meta_info"]["cached_tokens"] == 0
    finally:
        factory.stop_all()
