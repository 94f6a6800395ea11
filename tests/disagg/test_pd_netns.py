"""Prefill and decode on two machines, as two network namespaces joined by a veth pair:
prefill binds 0.0.0.0 and must advertise its veth address (never loopback), decode and the
router bind their own. Tokens equal a colocated server's, and every PD connection runs
between the two addresses. Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdserve import procs
from tests.disagg import netns
from tests.helpers import ServerProcess, http_json

pytestmark = pytest.mark.timeout(300)
WHY_NOT = netns.unavailable()
SECRET = "netns-secret"
PORT = {"prefill": 31000, "bootstrap": 31001, "decode": 31002, "router": 31003}
A, B = netns.ADDRESS["a"], netns.ADDRESS["b"]
BODY = {"input_ids": list(range(7, 90)), "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
TINY = ["--model-path", "tiny-random", "--torch-threads", "1", "--disagg-secret", SECRET]


def _start(namespace: str, argv: list[str], ready_urls: list[str]) -> ServerProcess:
    server = ServerProcess(argv, [])
    server.argv = [*netns.exec_argv(namespace), *server.argv]
    server.start()
    try:
        netns.call_in(
            namespace, lambda: procs.wait_ready(ready_urls, [server.proc], 180.0, interval_s=0.1)
        )
    except (procs.ProcessExited, procs.NotReady) as exc:
        tail = server.output_tail()
        server.stop()
        raise RuntimeError(f"{argv[:3]} in {namespace}: {exc}:\n{tail}") from None
    return server


@pytest.fixture(scope="module")
def machines() -> Iterator[dict]:
    if WHY_NOT:
        print(f"skipped: {WHY_NOT}")
        pytest.skip(WHY_NOT)
    started: list[ServerProcess] = []
    with netns.namespace_pair() as ns:
        try:
            prefill_url, decode_url = (
                f"http://{A}:{PORT['prefill']}",
                f"http://{B}:{PORT['decode']}",
            )
            started.append(
                _start(
                    ns["a"],
                    [
                        "serve",
                        *TINY,
                        "--mode",
                        "prefill",
                        "--host",
                        "0.0.0.0",
                        "--port",
                        str(PORT["prefill"]),
                        "--bootstrap-port",
                        str(PORT["bootstrap"]),
                    ],
                    [
                        f"http://{A}:{PORT['prefill']}/health",
                        f"http://{A}:{PORT['bootstrap']}/route",
                    ],
                )
            )
            started.append(
                _start(
                    ns["b"],
                    [
                        "serve",
                        *TINY,
                        "--mode",
                        "decode",
                        "--host",
                        B,
                        "--port",
                        str(PORT["decode"]),
                    ],
                    [f"{decode_url}/health"],
                )
            )
            started.append(_start(ns["b"], [
                "router", "--host", B, "--port", str(PORT["router"]),
                "--prefill", prefill_url, str(PORT["bootstrap"]), "--decode", decode_url,
            ], [f"http://{B}:{PORT['router']}/readiness"]))  # fmt: skip
            yield {
                "ns": ns,
                "prefill": prefill_url,
                "router": f"http://{B}:{PORT['router']}",
                "servers": started,
            }
        finally:
            for server in reversed(started):
                server.__exit__(None, None, None)


def test_prefill_bound_to_all_interfaces_advertises_its_routable_address(machines):
    ns = machines["ns"]
    _, info = netns.call_in(ns["b"], lambda: http_json("GET", machines["prefill"] + "/server_info"))
    assert info["bootstrap_host"] == A
    bootstrap = f"http://{A}:{PORT['bootstrap']}/route?prefill_dp_rank=0"
    status, worker = netns.call_in(ns["b"], lambda: http_json("GET", bootstrap))
    assert status == 200 and worker["kv_endpoint"].startswith(f"tcp://{A}:"), worker


def test_a_routable_bind_without_a_credential_is_warned_at_start(machines):
    prefill_log, decode_log, router_log = (s.output() for s in machines["servers"])
    assert "WARNING: HTTP bound to 0.0.0.0 without --api-key" in prefill_log
    assert f"WARNING: HTTP bound to {B} without --api-key" in decode_log
    assert f"WARNING: router bound to {B} without --api-key" in router_log
    assert "without --disagg-secret" not in prefill_log + decode_log  # they have the secret


def test_tokens_cross_the_veth_and_equal_the_colocated_ones(machines, tiny_server):
    ns = machines["ns"]
    expected = http_json("POST", tiny_server.url + "/generate", BODY)[1]["output_ids"]
    status, answer = netns.call_in(
        ns["b"], lambda: http_json("POST", machines["router"] + "/generate", BODY)
    )
    assert status == 200, answer
    assert answer["output_ids"] == expected
    # Every connection between the machines runs between their veth addresses; none of the
    # prefill's PD ports (bootstrap, KV control, KV data) is reached over loopback.
    established = netns.sockets(ns["a"], "established")
    from_decode = [(local, peer) for local, peer in established if peer.startswith(B + ":")]
    assert from_decode, established
    assert all(local.startswith(A + ":") for local, _ in from_decode), from_decode
    kv_port = _kv_port(ns)
    reached_locally = [
        (local, peer)
        for local, peer in established
        if local.startswith("127.") and local.endswith((f":{PORT['bootstrap']}", f":{kv_port}"))
    ]
    assert reached_locally == [], reached_locally
    kv_peers = [peer for local, peer in established if local.endswith(f":{kv_port}")]
    assert kv_peers and all(p.startswith(B + ":") for p in kv_peers), established


def _kv_port(ns: dict[str, str]) -> int:
    bootstrap = f"http://{A}:{PORT['bootstrap']}/route?prefill_dp_rank=0"
    _, worker = netns.call_in(ns["b"], lambda: http_json("GET", bootstrap))
    return int(worker["kv_endpoint"].rsplit(":", 1)[1])
