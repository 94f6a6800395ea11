"""PD serving on an IPv6 host: router, prefill and decode all listen on ::1 and the router
names its workers by bracketed URLs (http://[::1]:port); the bootstrap server, the KV
endpoints advertised through it (tcp://[::1]:port) and the raw data connection all run over
IPv6. At temperature 0 the tokens equal the colocated server's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.disagg.conftest import PDFactory, Prefill
from tests.disagg.pd_driver import wait_idle
from tests.helpers import ServerProcess, ipv6_loopback_missing
from tests.router.conftest import router_args, start_router
from tests.router.test_sglang_router import sglang_router_process

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(ipv6_loopback_missing() is not None, reason=str(ipv6_loopback_missing())),
]

GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def ipv6_pair() -> Iterator[tuple[Prefill, ServerProcess]]:
    factory = PDFactory(host="::1")
    try:
        prefill, decode = factory.prefill(1), factory.decode(1)
        assert prefill.url.startswith("http://[::1]:")
        yield prefill, decode
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def ipv6_router(ipv6_pair) -> Iterator[ServerProcess]:
    prefill, decode = ipv6_pair
    args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
    with start_router(args, host="::1") as router:
        yield router


def test_pd_on_ipv6_loopback_equals_colocated(ipv6_router, tiny_server):
    body = {"text": ["The capital of France is", "a b c"], "sampling_params": GREEDY}
    want = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    resp = requests.post(ipv6_router.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert all(g["meta_info"]["kv_transfer_bytes"] > 0 for g in got)  # the KV came over ::1


def test_sglang_router_on_ipv6_equals_colocated(ipv6_pair, tiny_server):
    """SGLang's router sends an IPv6 prefill URL's host with its brackets
    (`bootstrap_host: "[::1]"`): the servers take it as the address (both legs answered
    400 before)."""
    prefill, decode = ipv6_pair
    body = {"input_ids": list(range(5, 45)), "sampling_params": GREEDY}
    want = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    with sglang_router_process([(prefill.url, prefill.bootstrap_port)], [decode.url]) as router:
        router.start(timeout_s=120)
        resp = requests.post(router.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["output_ids"] == want["output_ids"]
    wait_idle([prefill.url, decode.url])
