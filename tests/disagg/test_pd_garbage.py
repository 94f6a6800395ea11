"""Garbage in the routing fields of PD requests: each is a quick 4xx naming the field, on
both servers, and both keep serving afterwards."""

from __future__ import annotations

import pytest
import requests

from tests.disagg.pd_driver import pd_generate, wait_idle

BODY = {
    "input_ids": [5, 6, 7, 8, 9, 10],
    "sampling_params": {"max_new_tokens": 3, "temperature": 0},
}

GARBAGE = [
    ({"bootstrap_room": -1}, "bootstrap_room"),
    ({"bootstrap_room": 2**63}, "bootstrap_room"),
    ({"bootstrap_room": "12"}, "bootstrap_room"),
    ({"bootstrap_room": 1.5}, "bootstrap_room"),
    ({"bootstrap_room": True}, "bootstrap_room"),
    ({"bootstrap_room": [1, 2]}, "bootstrap_room"),
    ({"bootstrap_room": 1, "routed_dp_rank": 2}, "out of range"),
    ({"bootstrap_room": 1, "routed_dp_rank": -1}, "routed_dp_rank"),
    ({"bootstrap_room": 1, "routed_dp_rank": "0"}, "routed_dp_rank"),
    ({"bootstrap_room": 1, "data_parallel_rank": 7}, "out of range"),
    ({"bootstrap_room": 1, "disagg_prefill_dp_rank": "1"}, "disagg_prefill_dp_rank"),
    ({"bootstrap_room": 1, "disagg_prefill_dp_rank": 1.0}, "disagg_prefill_dp_rank"),
    ({"bootstrap_room": 1, "disagg_prefill_dp_rank": 9}, "disagg_prefill_dp_rank"),
    ({"bootstrap_room": 1, "disagg_prefill_dp_rank": -3}, "disagg_prefill_dp_rank"),
]

DECODE_ONLY_GARBAGE = [
    ({"bootstrap_room": 1, "bootstrap_host": 12}, "bootstrap_host"),
    ({"bootstrap_room": 1, "bootstrap_host": ""}, "bootstrap_host"),
    ({"bootstrap_room": 1, "bootstrap_host": "a" * 64}, "bootstrap_host"),  # was a 500 (idna)
    ({"bootstrap_room": 1, "bootstrap_host": "http://127.0.0.1"}, "bootstrap_host"),
    ({"bootstrap_room": 1, "bootstrap_host": "127.0.0.1", "bootstrap_port": "x"}, "bootstrap_port"),
    (
        {"bootstrap_room": 1, "bootstrap_host": "127.0.0.1", "bootstrap_port": 70000},
        "bootstrap_port",
    ),
]


@pytest.fixture(scope="module")
def servers(pd_module):
    return pd_module.prefill(2), pd_module.decode(2)


@pytest.mark.parametrize("fields,needle", GARBAGE, ids=[str(f) for f, _ in GARBAGE])
def test_garbage_routing_fields_are_a_quick_400_on_both_servers(servers, fields, needle):
    prefill, decode = servers
    body = dict(BODY, bootstrap_host="127.0.0.1", bootstrap_port=prefill.bootstrap_port, **fields)
    for url in (prefill.url, decode.url):
        resp = requests.post(url + "/generate", json=body, timeout=5)
        assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text)
        assert needle in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize(
    "fields,needle", DECODE_ONLY_GARBAGE, ids=[str(f) for f, _ in DECODE_ONLY_GARBAGE]
)
def test_garbage_bootstrap_address_is_a_quick_400_on_decode(servers, fields, needle):
    _, decode = servers
    resp = requests.post(decode.url + "/generate", json=dict(BODY, **fields), timeout=5)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]


def test_servers_still_serve_after_the_garbage(servers):
    prefill, decode = servers
    result = pd_generate(prefill.url, decode.url, BODY, bootstrap_port=prefill.bootstrap_port)
    assert result.prefill.ok and result.decode.ok, (result.prefill.body, result.decode.body)
    wait_idle([prefill.url, decode.url])
