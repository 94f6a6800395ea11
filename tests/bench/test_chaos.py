"""A short chaos soak (20 s of load on tiny-random): router + 2 prefill + 2 decode
servers while seeded faults kill, freeze and restart servers and workers. Every request ends
with the reference's tokens or a reason, nothing leaks, and no process outlives the run.
Select it alone with `-m chaos`; the long run is `python -m pdserve.bench.chaos`."""

from __future__ import annotations

import pytest

from pdserve.bench.chaos import ChaosConfig, run
from pdserve.bench.chaos_core import FAILED, LOST, WRONG, render_text

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_short_chaos_soak_loses_nothing_leaks_nothing_and_leaves_no_orphans():
    config = ChaosConfig(
        duration_s=20, clients=3, seed=4, prefill_dp=2, decode_dp=1,
        min_gap_s=1, max_gap_s=3, min_pause_s=0.5, max_pause_s=2, ready_timeout_s=240,
    )  # fmt: skip
    summary = run(config)
    text = render_text(summary)
    print(text)
    assert summary.faults, text
    # every worker fault found its server's workers (one with none to hit checks nothing)
    assert not any(f.skipped for f in summary.faults), text
    assert summary.outcomes.get(LOST, 0) == 0, text
    assert summary.outcomes.get(WRONG, 0) == 0, text
    assert summary.outcomes.get("ok", 0) > 0, text
    assert summary.drain_s is not None, text  # every live server back to 0 pages, 0 rooms
    idle = {"pages": 0, "rooms": 0, "reqs": 0, "metrics_pages": 0, "unhealthy": 0}
    decode_idle = dict(idle, stale_kv_peers=0)  # no prefill worker dialed past those there are
    assert all(
        v == (decode_idle if name.startswith("decode") else idle)
        for name, v in summary.leaks.items()
    ), summary.leaks
    assert summary.orphans == [], text
    assert summary.passed, text
    # every failure carried an HTTP status and a message
    assert all(key[:3].isdigit() for key in summary.failures_by_reason), text
    assert summary.outcomes.get(FAILED, 0) == sum(
        v["count"] for v in summary.failures_by_reason.values()
    )
