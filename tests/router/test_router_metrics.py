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
