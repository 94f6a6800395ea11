"""PD serving on an IPv6 host: router, prefill and decode all listen on ::1 and the router
names its workers by bracketed URLs (http://[::1]:port); the bootstrap server, the KV
endpoints advertised through it (tcp://[::1]:port) and the raw data connection all run over
IPv6. At temperature 0 the tokens equal the colocated server's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.disagg.conftest import PDFactory
from tests.helpers import ServerProcess, ipv6_loopback_missing
from tests.router.conftest import router_args, start_router

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(ipv6_loopback_missing() is not None, reason=str(ipv6_loopback_missing())),
]

GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def ipv6_router() -> Iterator[ServerProcess]:
    factory = PDFactory(host="::1")
    try:
        prefill, decode = factory.prefill(1), factory.decode(1)
        assert prefill.url.startswith("http://[::1]:")
        with start_router(
            router_args([(prefill.url, prefill.bootstrap_port)], [decode.url]), host="::1"
        ) as router:
            yield router
    finally:
        factory.stop_all()


def test_pd_on_ipv6_loopback_equals_colocated(ipv6_router, tiny_server):
    body = {"text": ["The capital of France is", "a b c"], "sampling_params": GREEDY}
    want = requests.post(tiny_server.url + "/generate", json=body, timeout=60).json()
    resp = requests.post(ipv6_router.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert all(g["meta_info"]["kv_transfer_bytes"] > 0 for g in got)  # the KV came over ::1
