"""A leg killed mid-stream, with real servers: the client hears a clear error within
seconds (never a hang), and the surviving server frees every page of the request."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pdserve.bench import proc_tree
from pdserve.serving.hooks import SHUTTING_DOWN
from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import (
    leg_body,
    pages_in_use,
    post_async,
    random_room,
    rooms_in_flight,
    wait_idle,
)
from tests.helpers import wait_until
from tests.router.conftest import StubWorker, router_args, start_router
from tests.router.test_router_shell import metric

pytestmark = pytest.mark.timeout(300)
LONG = {
    "input_ids": list(range(10, 80)),
    "stream": True,
    "sampling_params": {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True},
}
SHORT = {"input_ids": list(range(10, 30)), "sampling_params": {"max_new_tokens": 4}}


@pytest.fixture
def pd_router():
    factory = PDFactory()
    try:
        prefill, decode = factory.prefill(1), factory.decode(1)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
        with start_router(args + ["--health-failure-threshold", "1"]) as router:
            yield prefill, decode, router
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def live_pair():
    """A default prefill + decode pair for the tests that freeze a worker only for a while
    or fail one room, each through a router of its own: both servers stay up, and each
    test leaves them idle and in service."""
    factory = PDFactory()
    try:
        yield factory.prefill(1), factory.decode(1)
    finally:
        factory.stop_all()


def stream_until_killed(router_url: str, kill) -> tuple[list[dict], float]:
    """Start a long stream, call `kill()` after its first event; (events, seconds from the
    kill to the end of the stream)."""
    with requests.post(router_url + "/generate", json=LONG, stream=True, timeout=(5, 30)) as resp:
        assert resp.status_code == 200, resp.text
        lines = (line for line in resp.iter_lines() if line)
        events = [json.loads(next(lines)[6:])]
        kill()
        killed_at = time.monotonic()
        events += [json.loads(line[6:]) for line in lines if line != b"data: [DONE]"]
    return events, time.monotonic() - killed_at


def test_decode_killed_mid_stream(pd_router):
    prefill, decode, router = pd_router
    events, after_kill_s = stream_until_killed(
        router.url, lambda: decode.signal_group(signal.SIGKILL)
    )
    assert after_kill_s < 10  # a deadline, not a speed claim: the router sees the reset at once
    error = events[-1]["error"]
    assert error["code"] == 502 and "decode server" in error["message"], error
    assert len(events[-2]["output_ids"]) < 3000  # it really was cut short
    wait_idle([prefill.url])
    wait_until(
        lambda: requests.get(router.url + "/readiness").status_code == 503,
        10,
        "router to notice the dead decode server",
    )
    resp = requests.post(router.url + "/generate", json={**LONG, "stream": False}, timeout=10)
    assert resp.status_code == 503 and "no healthy decode" in resp.json()["error"]["message"]


def test_prefill_killed_mid_stream(pd_router):
    """Decode already holds the KV: it may finish the stream or fail it, but within seconds,
    and it frees its pages either way."""
    prefill, decode, router = pd_router
    events, _ = stream_until_killed(router.url, lambda: prefill.server.signal_group(signal.SIGKILL))
    last = events[-1]
    assert "error" in last or len(last["output_ids"]) == 3000
    wait_until(lambda: pages_in_use(decode.url) == 0, 30, "decode pages to be freed")


def router_workers(router_url: str) -> dict[str, dict]:
    workers = requests.get(router_url + "/workers", timeout=10).json()["workers"]
    return {w["url"]: w for w in workers}


def generate_with_a_worker_frozen(router_url: str, server_pid: int) -> requests.Response:
    """One /generate through the router while the server's first DP worker is stopped
    (SIGSTOP: frozen, not dead); the worker is thawed whatever happens."""
    worker_pid = proc_tree.worker_pids(server_pid)[0]
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        return requests.post(router_url + "/generate", json=SHORT, timeout=30)
    finally:
        os.kill(worker_pid, signal.SIGCONT)


def serves_again(router_url: str) -> None:
    """The router takes both servers back and a request succeeds."""
    wait_until(
        lambda: requests.get(router_url + "/readiness").status_code == 200,
        30,
        "the router to have both servers in rotation",
    )
    resp = requests.post(router_url + "/generate", json=SHORT, timeout=30)
    assert resp.status_code == 200, resp.text


def test_a_decode_worker_killed_leaves_the_other_decode_server_serving():
    """A worker of decode server 1 dies while requests flow: its failures are retried on
    decode server 2, and no request gets `503 no healthy decode server`."""
    factory = PDFactory()
    try:
        prefill, d1, d2 = factory.prefill(1), factory.decode(2), factory.decode(1)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [d1.url, d2.url])
        with start_router(args + ["--health-check-interval-s", "1"]) as router:
            wait_until(
                lambda: all(w["available"] for w in router_workers(router.url).values()),
                30,
                "every server to be in rotation",
            )
            statuses = []
            os.kill(proc_tree.worker_pids(d1.pid)[0], signal.SIGKILL)
            while router_workers(router.url)[d1.url]["healthy"]:
                resp = requests.post(router.url + "/generate", json=SHORT, timeout=30)
                statuses.append((resp.status_code, resp.text[:200]))
            statuses += [
                (resp.status_code, resp.text[:200])
                for resp in (requests.post(router.url + "/generate", json=SHORT, timeout=30)
                             for _ in range(4))
            ]  # fmt: skip
            assert [s for s in statuses if s[0] != 200] == [], statuses
    finally:
        factory.stop_all()


def test_a_decode_leg_failed_by_its_prefill_worker_leaves_decode_in_rotation(live_pair):
    """Decode fails a room whose prefill worker froze (its heartbeat, while the prefill leg
    is still in flight): that is no verdict on the decode server, so its circuit breaker (one
    failure opens it here) stays closed and the next request, once prefill thaws, is served
    instead of getting `503 no healthy decode server` for the breaker's open period. The
    module's prefill, thawed and serving again by the end; a decode of its own."""
    factory = PDFactory()
    heartbeat = ["--heartbeat-interval-s", "0.2", "--heartbeat-timeout-s", "1.0"]
    try:
        prefill, decode = live_pair[0], factory.decode(1, heartbeat)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
        breaker = ["--cb-failure-threshold", "1", "--max-retries", "0"]
        with start_router(args + breaker) as router:
            # The KV connection exists (and heartbeats) before the worker freezes.
            assert requests.post(router.url + "/generate", json=SHORT, timeout=30).ok
            resp = generate_with_a_worker_frozen(router.url, prefill.server.pid)
            assert resp.status_code == 503 and "heartbeat" in resp.text, resp.text
            assert router_workers(router.url)[decode.url]["circuit"] == "closed"
            serves_again(router.url)
            wait_idle([prefill.url, decode.url])
    finally:
        factory.stop_all()


def test_a_room_prefill_fails_with_500_leaves_decode_in_rotation(live_pair):
    """Prefill fails a room with a 500 (as when its DP worker exits) while the router's
    prefill leg still runs: decode relays it marked `origin: prefill`, and the router gives
    no verdict on decode, whose breaker (one failure opens it here) stays closed. The
    router's prefill leg goes to a stub that holds it, so decode's answer comes first; the
    room's KV and its failure are the real prefill server's."""
    stub = StubWorker("p1", "prefill")
    try:
        stub.proc.start(timeout_s=30)
        prefill, decode = live_pair
        args = router_args([(stub.url, prefill.bootstrap_port)], [decode.url])
        breaker = ["--cb-failure-threshold", "1", "--max-retries", "0"]
        with start_router(args + breaker) as router, ThreadPoolExecutor(1) as pool:
            body = {**SHORT, "stub": {"p1": {"hold": "never"}}}
            answer = pool.submit(requests.post, router.url + "/generate", json=body, timeout=30)
            wait_until(lambda: stub.log()["bodies"], 30, "the prefill leg to reach the stub")
            room = stub.log()["bodies"][0]["bootstrap_room"]
            failure = {"bootstrap_room": room, "error": "worker 0 exited", "status": 500}
            bootstrap = f"http://127.0.0.1:{prefill.bootstrap_port}/register_dp_rank"
            requests.post(bootstrap, json=failure, timeout=10).raise_for_status()
            resp = answer.result()
            error = resp.json()["error"]
            assert resp.status_code == 500 and "worker 0 exited" in error["message"], error
            assert error["origin"] == "prefill" and error["worker"]["role"] == "decode"
            assert router_workers(router.url)[decode.url]["circuit"] == "closed"
        wait_idle([prefill.url, decode.url])
    finally:
        stub.proc.__exit__(None, None, None)


def test_a_frozen_decode_worker_leaves_prefill_in_rotation(live_pair):
    """A decode worker frozen (SIGSTOP) never sends its page list, so the prefill leg of its
    room waits until the router's deadline: that is no verdict on the prefill server, whose
    breaker (one failure opens it here) stays closed, and once decode thaws it serves. The
    client's error names decode (it read `prefill server failed`: prefill's leg, sent
    first, met the deadline first)."""
    prefill, decode = live_pair
    args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
    limits = ["--cb-failure-threshold", "1", "--max-retries", "0", "--request-timeout-s", "2"]
    with start_router(args + limits) as router:
        resp = generate_with_a_worker_frozen(router.url, decode.pid)
        assert resp.status_code == 504, resp.text
        error = resp.json()["error"]
        assert error["message"].startswith("decode server failed"), error
        assert error["worker"] == {"url": decode.url, "role": "decode"}
        assert router_workers(router.url)[prefill.url]["circuit"] == "closed"
        serves_again(router.url)
        wait_idle([prefill.url, decode.url])


def test_a_frozen_decode_worker_is_named_by_prefill_and_avoided_by_the_retry():
    """A decode worker frozen: prefill's own deadline for decode's page list ends the room
    first (504), marked `origin: decode`, so the client learns decode did not take the KV.
    With retries, the retry avoids that decode server (it avoided prefill, the one server
    that answered) and the other decode server serves the request. cache_aware would send
    the retry back to the servers of the first attempt unless avoided."""
    factory = PDFactory()
    try:
        prefill = factory.prefill(1, ["--bootstrap-timeout-s", "2"])
        d1, d2 = factory.decode(1), factory.decode(1)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [d1.url, d2.url])
        with (
            start_router(args + ["--max-retries", "0"]) as once,
            start_router(args + ["--policy", "cache_aware"]) as retrying,
        ):
            resp = generate_with_a_worker_frozen(once.url, d1.pid)
            error = resp.json()["error"]
            assert resp.status_code == 504 and "decode's page list" in error["message"], error
            assert error["origin"] == "decode" and error["worker"]["url"] == prefill.url
            resp = generate_with_a_worker_frozen(retrying.url, d1.pid)
            assert resp.status_code == 200, resp.text
            legs = [
                metric(retrying, "pdserve_router_worker_requests_total", worker=d.url)
                for d in (d1, d2)
            ]
            assert legs == [1, 1]  # the first attempt went to the frozen one, the retry not
            wait_idle([prefill.url, d1.url, d2.url])
    finally:
        factory.stop_all()


def test_a_frozen_prefill_worker_is_named_by_decode_and_avoided_by_the_retry():
    """A prefill worker frozen: decode's KV handshake with it is not answered within
    decode's --bootstrap-timeout-s (504), which decode marks `origin: prefill`, so the retry
    avoids that prefill server and the other one serves the request. The 504 had no origin:
    the retry avoided decode, the one server that answered, and cache_aware sent it back
    to the frozen prefill until the retries ran out."""
    factory = PDFactory()
    try:
        p1, p2 = factory.prefill(1), factory.prefill(1)
        decode = factory.decode(1, ["--bootstrap-timeout-s", "2"])
        args = router_args([(p.url, p.bootstrap_port) for p in (p1, p2)], [decode.url])
        with start_router(args + ["--policy", "cache_aware"]) as router:
            resp = generate_with_a_worker_frozen(router.url, p1.server.pid)
            assert resp.status_code == 200, resp.text
            legs = [
                metric(router, "pdserve_router_worker_requests_total", worker=p.url)
                for p in (p1, p2)
            ]
            assert legs == [1, 1]  # the first attempt went to the frozen one, the retry not
            wait_idle([p1.url, p2.url, decode.url], timeout_s=30)
    finally:
        factory.stop_all()


def test_a_draining_prefill_server_opens_no_circuit_breaker():
    """A prefill server stopped for a rolling restart (SIGTERM) drains: it answers new
    requests 503 `the server is shutting down`, and decode relays it on the other leg. The
    router counted those as failures of the server, so a drain opened its breaker (one
    failure opens it here), which kept the restarted server out of rotation for the open
    period. The drain is held open by a prefill leg alone, waiting for decode's page list."""
    factory = PDFactory()
    try:
        prefill = factory.prefill(1, ["--shutdown-timeout-s", "600"])
        decode = factory.decode(1)
        args = router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])
        # Health checks rare: they would take the draining server out before the requests.
        limits = ["--cb-failure-threshold", "1", "--max-retries", "0"]
        with start_router(args + limits + ["--health-check-interval-s", "600"]) as router:
            room, ids = random_room(), SHORT["input_ids"]
            held = post_async(prefill.url, leg_body(prefill.bootstrap_port, room, ids, "held"))
            wait_until(lambda: rooms_in_flight(prefill.url) == 1, 30, "the held prefill leg")
            prefill.server.signal_group(signal.SIGTERM)
            wait_until(lambda: requests.get(prefill.url + "/health").status_code == 503, 30,
                       "the drain")  # fmt: skip
            for _ in range(3):
                resp = requests.post(router.url + "/generate", json=SHORT, timeout=30)
                assert resp.status_code == 503 and SHUTTING_DOWN in resp.text, resp.text
            workers = router_workers(router.url)
            assert workers[prefill.url]["circuit"] == "closed", workers
            assert workers[decode.url]["circuit"] == "closed", workers
            # The leg in flight when the drain began is served: its decode leg comes now.
            decode_leg = post_async(decode.url, leg_body(prefill.bootstrap_port, room, ids, "d"))
            assert held.result().status_code == 200 and decode_leg.result().status_code == 200
    finally:
        factory.stop_all()
