"""The router against stub workers whose life changes under it: a server back with another DP
size, a worker removed while its health check is in flight, `POST /flush_cache` fanned out
to every worker, and the PD path counted once per request however many retries it took."""

from __future__ import annotations

import psutil
import pytest
import requests

from tests.disagg.pd_driver import metric_value
from tests.helpers import free_port, launch_server, wait_until
from tests.router.test_router_shell import pd_args

pytestmark = pytest.mark.timeout(120)


def worker_of(router_url: str, url: str) -> dict | None:
    workers = requests.get(f"{router_url}/workers", timeout=10).json()["workers"]
    return next((w for w in workers if w["url"] == url), None)


def generate_ok(router_url: str) -> None:
    resp = requests.post(f"{router_url}/generate", json={"text": "x"}, timeout=10)
    assert resp.status_code == 200, resp.text


def test_a_server_back_from_failed_checks_has_its_new_dp_size(stubs, router_factory):
    """round_robin without --dp-aware polls no load: only the way back reads it."""
    p2 = stubs["p2"]
    router = router_factory(pd_args(stubs, prefills=("p2",)))
    assert worker_of(router.url, p2.url)["dp_size"] == 1
    p2.control(health_status=503)
    wait_until(lambda: not worker_of(router.url, p2.url)["healthy"], 20, "p2 marked unhealthy")
    p2.control(health_status=200, dp_size=2)  # restarted with --dp-size 2 on the same URL
    wait_until(lambda: worker_of(router.url, p2.url)["healthy"], 20, "p2 healthy again")
    assert worker_of(router.url, p2.url)["dp_size"] == 2


def test_a_server_back_from_failed_checks_takes_requests_despite_its_open_breaker(
    stubs, router_factory
):
    """A decode server restarted quickly: the requests that failed while it was down opened
    its breaker (for 60 s here), its checks failed, then passed. It serves again at once
    (a probe first), where the router answered 503 to every request for the rest of
    --cb-open-s, its only decode server up and healthy."""
    d1 = stubs["d1"]
    breaker = ["--max-retries", "0", "--cb-failure-threshold", "2", "--cb-open-s", "60"]
    router = router_factory(pd_args(stubs) + breaker)
    down = {"text": "x", "stub": {"d1": {"status": 500}}}
    for _ in range(2):
        assert requests.post(f"{router.url}/generate", json=down, timeout=10).status_code == 500
    assert worker_of(router.url, d1.url)["circuit"] == "open"
    d1.control(health_status=503)
    wait_until(lambda: not worker_of(router.url, d1.url)["healthy"], 20, "d1 marked unhealthy")
    d1.control(health_status=200)
    wait_until(lambda: worker_of(router.url, d1.url)["healthy"], 20, "d1 healthy again")
    for _ in range(3):  # the probe, then the breaker closes (2 successes)
        generate_ok(router.url)
    assert worker_of(router.url, d1.url)["circuit"] == "closed"


def test_dp_aware_sees_a_healthy_servers_new_dp_size_and_uses_its_ranks(stubs, router_factory):
    p2 = stubs["p2"]
    router = router_factory(pd_args(stubs, prefills=("p2",)) + ["--dp-aware"])
    generate_ok(router.url)
    p2.control(dp_size=2)  # a restart faster than the failure threshold: never unhealthy
    wait_until(lambda: worker_of(router.url, p2.url)["dp_size"] == 2, 20, "p2's DP size 2")
    p2.control(reset=True)
    for _ in range(4):
        generate_ok(router.url)
    assert {b["routed_dp_rank"] for b in p2.log()["bodies"]} == {0, 1}


def test_a_worker_removed_during_its_health_check_is_not_followed_again(stubs, router_factory):
    p1, d2 = stubs["p1"], stubs["d2"]
    d2.control(kv_events=True)
    args = pd_args(stubs, decodes=("d1", "d2"))
    router = router_factory(args + ["--policy", "kv_aware", "--health-check-timeout-s", "60"])

    def followed() -> set[str]:
        return set(requests.get(f"{router.url}/server_info", timeout=10).json()["kv_index"])

    wait_until(lambda: d2.url in followed(), 20, "d2 followed")
    d2.control(health_status=503)
    wait_until(lambda: d2.url not in followed(), 20, "d2 unfollowed once unhealthy")
    d2.control(health_status=200, info_hold="info")
    wait_until(lambda: d2.log()["infos_held"] >= 1, 20, "a check of d2 reading /server_info")
    removed = requests.delete(f"{router.url}/workers", params={"url": d2.url}, timeout=10)
    assert removed.status_code == 200, removed.text
    d2.release("info")
    # Checks run in rounds: once p1 sees a later round's check, d2's answer was handled.
    seen = p1.log()["health_checks"]
    wait_until(lambda: p1.log()["health_checks"] > seen, 20, "the next round of checks")
    info = requests.get(f"{router.url}/server_info", timeout=10).json()
    assert d2.url not in info["kv_index"]
    assert d2.url not in {w["url"] for w in info["workers"]}


def test_a_worker_advertising_unusable_kv_events_endpoints_is_routed_by_load(stubs, router_factory):
    """ZeroMQ refuses to connect to 'tcp://127.0.0.1' (no port): that error escaped the
    health check, ending the loop that checks every worker, so the router was never ready
    and no worker's health was checked again. The worker is now served, unindexed."""
    d1, d2 = stubs["d1"], stubs["d2"]
    d2.control(kv_events="tcp://127.0.0.1")
    args = pd_args(stubs, decodes=("d1", "d2")) + ["--policy", "kv_aware"]
    router = router_factory(args, timeout_s=30)
    wait_until(lambda: worker_of(router.url, d2.url)["healthy"], 20, "d2 healthy")
    info = requests.get(f"{router.url}/server_info", timeout=10).json()
    assert d2.url not in info["kv_index"]
    generate_ok(router.url)
    d1.control(health_status=503)  # the checks go on
    wait_until(lambda: not worker_of(router.url, d1.url)["healthy"], 20, "d1 marked unhealthy")


def test_flush_cache_asks_every_worker_and_names_those_that_failed(stubs, router_factory):
    router = router_factory(pd_args(stubs, decodes=("d1", "d2")))
    ok = requests.post(f"{router.url}/flush_cache", timeout=10)
    assert ok.status_code == 200, ok.text
    assert all(w["ok"] for w in ok.json()["workers"]) and len(ok.json()["workers"]) == 3
    assert [stubs[n].log()["flushes"] for n in ("p1", "d1", "d2")] == [1, 1, 1]
    stubs["d2"].control(flush_status=500)
    failed = requests.post(f"{router.url}/flush_cache", timeout=10)
    assert failed.status_code == 502
    message = failed.json()["error"]["message"]
    assert "1 of 3" in message and stubs["d2"].url in message and "HTTP 500" in message
    assert [stubs[n].log()["flushes"] for n in ("p1", "d1", "d2")] == [2, 2, 2]


def test_a_retried_request_counts_its_path_once(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--max-retries", "2", "--retry-backoff-s", "0.01"])
    body = {"text": "x", "stub": {"d1": {"status": 503}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 503
    assert len(stubs["d1"].log()["bodies"]) == 3  # three attempts, one client request
    name = "pdserve_router_request_paths_total"
    assert metric_value(router.url, name, {"path": "disaggregated"}) == 1
    generate_ok(router.url)
    assert metric_value(router.url, name, {"path": "disaggregated"}) == 2


def test_a_server_of_another_mode_than_its_role_stays_out_of_rotation(stubs):
    """Swapped, a prefill server given as decode would answer the client with its one-token
    leg, silently cut short: each is refused, with a warning, and so is POST /workers."""
    args = ["--health-check-interval-s", "0.2", *pd_args(stubs, prefills=("d1",), decodes=("p2",))]
    for name in ("d1", "p2"):
        stubs[name].control(reset=True)  # its health checks counted from here
    with launch_server(args, subcommand="router", port=free_port()) as router:  # never ready
        check_swapped(router, stubs)


def check_swapped(router, stubs) -> None:
    d1, p2 = stubs["d1"], stubs["p2"]
    wait_until(lambda: d1.log()["health_checks"] >= 3, 20, "d1 checked three times")
    wait_until(lambda: p2.log()["health_checks"] >= 3, 20, "p2 checked three times")
    assert not worker_of(router.url, d1.url)["healthy"]
    assert not worker_of(router.url, p2.url)["healthy"]
    resp = requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10)
    assert resp.status_code == 503, resp.text
    assert "it is a decode server" in router.output() and "not a prefill one" in router.output()
    added = {"url": stubs["p1"].url, "role": "decode"}
    resp = requests.post(f"{router.url}/workers", json=added, timeout=10)
    assert resp.status_code == 400 and "it is a prefill server" in resp.text, resp.text
    assert worker_of(router.url, stubs["p1"].url) is None


def test_a_refused_worker_add_leaves_no_connection_to_it(stubs, router_factory):
    """POST /workers probes the server (/health, /server_info) over the router's keep-alive
    pool for its URL: refused (another mode than the role given, here), the pool and its idle
    connection were kept, the connection until the server's idle timeout (75 s for
    pdserve and aiohttp), the pool for good."""
    p2 = stubs["p2"]
    router = router_factory(pd_args(stubs))
    port = int(p2.url.rsplit(":", 1)[1])

    def connections_to_p2() -> int:
        conns = psutil.Process(router.proc.pid).net_connections("tcp")
        return sum(1 for c in conns if c.raddr and c.raddr.port == port)

    for _ in range(2):
        added = {"url": p2.url, "role": "decode"}
        resp = requests.post(f"{router.url}/workers", json=added, timeout=10)
        assert resp.status_code == 400 and "it is a prefill server" in resp.text, resp.text
        wait_until(
            lambda: connections_to_p2() == 0, 10, "the router to close its probe's connection"
        )
