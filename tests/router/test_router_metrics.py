"""The router's /metrics against scripted stub workers: failures, aborts and worker state
count what happened, the same as GET /workers says."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import wait_until
from tests.router.test_router_shell import leave_after_first_event, metric, pd_args

pytestmark = pytest.mark.timeout(120)


def test_a_client_leaving_a_flowing_stream_counts_as_a_failed_request(stubs, router_factory):
    """A client that hangs up while decode's events keep coming is often seen by the
    router's next write, before its handler is cancelled: both legs were aborted but the
    request was counted in no failure reason (about one disconnect in ten)."""
    router = router_factory(pd_args(stubs))
    script = {"p1": {"hold": "never"}, "d1": {"chunks": 20000}}
    num_leaving = 30  # enough that the old code missed some in every run
    for _ in range(num_leaving):
        leave_after_first_event(router.url, script)
    wait_until(
        lambda: (
            metric(router, "pdserve_router_aborts_total", cause="client_disconnect")
            == 2 * num_leaving
        ),
        10,
        "abort metrics",
    )
    failures = metric(router, "pdserve_router_request_failures_total", reason="client_disconnect")
    assert failures == num_leaving


def test_a_worker_held_out_by_its_breaker_shows_in_metrics(stubs, router_factory):
    """/metrics showed health alone: a server out for its open breaker read healthy 1 there
    while GET /workers said circuit open, available false."""
    router = router_factory(
        pd_args(stubs) + ["--max-retries", "0", "--cb-failure-threshold", "2", "--cb-open-s", "60"]
    )
    body = {"text": "x", "stub": {"d1": {"status": 500}}}
    for _ in range(2):
        assert requests.post(f"{router.url}/generate", json=body, timeout=10).status_code == 500
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "open"
    d1, p1 = {"worker": stubs["d1"].url}, {"worker": stubs["p1"].url}
    assert metric(router, "pdserve_router_worker_circuit", state="open", **d1) == 1
    assert metric(router, "pdserve_router_worker_circuit", **d1) == 1  # one state at a time
    assert metric(router, "pdserve_router_worker_circuit", state="closed", **p1) == 1
    assert metric(router, "pdserve_router_worker_available", **d1) == 0
    assert metric(router, "pdserve_router_worker_available", **p1) == 1
    assert metric(router, "pdserve_router_worker_healthy", **d1) == 1


def test_a_stream_whose_decode_leg_broke_off_adds_no_router_latency(stubs, router_factory):
    """A stream decode dropped mid-way (or whose client left) observed its whole duration
    as time the router added: the decode leg's time was taken only at a stream's end, and
    0 stood for it, so a killed decode server showed as seconds of router overhead."""
    router = router_factory(pd_args(stubs) + ["--max-retries", "0"])
    script = {"d1": {"delay_s": 0.3, "chunks": 5, "die_after": 1}}
    body = {"text": "x", "stream": True, "stub": script}
    with requests.post(f"{router.url}/generate", json=body, stream=True, timeout=10) as resp:
        assert b'"error"' in resp.content  # the stream ends with decode's failure
    assert metric(router, "pdserve_router_request_duration_seconds_count") == 1
    assert metric(router, "pdserve_router_added_latency_seconds_count") == 0
    ok = {"text": "x", "stream": True, "stub": {"d1": {"delay_s": 0.3}}}
    with requests.post(f"{router.url}/generate", json=ok, stream=True, timeout=10) as resp:
        assert resp.ok and b"[DONE]" in resp.content
    assert metric(router, "pdserve_router_added_latency_seconds_count") == 1
    assert metric(router, "pdserve_router_added_latency_seconds_sum") < 0.3


def test_every_client_request_is_one_duration_observation(stubs, router_factory):
    """Requests the router refused itself (a body that is not JSON) were counted in
    pdserve_router_requests_total but not in the duration histogram, while a worker's
    refusal of the same kind was: rate(duration count) fell short of the request rate."""
    router = router_factory(pd_args(stubs))
    garbage = requests.post(f"{router.url}/generate", data=b"{not json", timeout=10)
    assert garbage.status_code == 400
    refused = {"text": "x", "stub": {"d1": {"status": 400}, "p1": {"status": 400}}}
    assert requests.post(f"{router.url}/generate", json=refused, timeout=10).status_code == 400
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok
    assert metric(router, "pdserve_router_requests_total") == 3
    assert metric(router, "pdserve_router_request_duration_seconds_count") == 3
    assert metric(router, "pdserve_router_added_latency_seconds_count") == 1


def test_a_retry_with_no_worker_left_to_try_is_not_counted(stubs, router_factory):
    """A failed attempt that took its server out of rotation (its breaker opened, or its
    health check failed: a killed server) left no worker to retry on, yet
    pdserve_router_retries_total counted a retry that sent no leg."""
    cb = ["--cb-failure-threshold", "1", "--cb-open-s", "60"]
    router = router_factory(pd_args(stubs) + ["--max-retries", "2", *cb])
    body = {"text": "x", "stub": {"d1": {"status": 502}}}
    assert requests.post(f"{router.url}/generate", json=body, timeout=10).status_code == 502
    assert metric(router, "pdserve_router_worker_requests_total", role="decode") == 1
    assert metric(router, "pdserve_router_retries_total") == 0
    again = router_factory(pd_args(stubs, decodes=("d2",)) + ["--max-retries", "2"])
    body = {"text": "x", "stub": {"d2": {"status": 502}}}  # retried on the same server
    assert requests.post(f"{again.url}/generate", json=body, timeout=10).status_code == 502
    assert metric(again, "pdserve_router_worker_requests_total", role="decode") == 3
    assert metric(again, "pdserve_router_retries_total") == 2
