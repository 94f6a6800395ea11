"""The chaos soak's pure part: judging answers, grouping failures, recovery times, and the
verdict that a lost request, wrong tokens, a leak or an orphan each fail the run."""

from __future__ import annotations

import random

from pdserve.bench.chaos_core import (
    FAILED,
    FAULT_KINDS,
    LOST,
    OK,
    WRONG,
    FaultRecord,
    RequestRecord,
    judge,
    next_fault,
    reason_key,
    recovery_s,
    render_text,
    summarize,
)

EXPECTED = [5, 6, 7]


def test_judge_tells_ok_wrong_failed_and_lost_apart():
    assert judge(200, {"output_ids": [5, 6, 7]}, EXPECTED) == (OK, "")
    assert judge(200, {"output_ids": [5, 6, 8]}, EXPECTED)[0] == WRONG
    abort = {"output_ids": [5], "meta_info": {"finish_reason": {"type": "abort", "message": "x"}}}
    assert judge(200, abort, EXPECTED) == (FAILED, "200 abort: x")
    assert judge(503, {"error": {"message": "no prefill"}}, EXPECTED) == (FAILED, "503 no prefill")
    assert judge(502, "Bad Gateway", EXPECTED)[0] == LOST  # no reason given
    assert judge(503, {"error": {"message": ""}}, EXPECTED)[0] == LOST
    assert judge(None, "ConnectionRefusedError()", EXPECTED)[0] == LOST


def test_a_stream_error_event_after_200_is_a_failure_with_its_reason():
    # http_stream hands back the stream's {"error": ...} event with the 200 that began it
    event = {"error": {"message": "prefill server failed: connection lost", "code": 502}}
    assert judge(200, event, EXPECTED) == (
        FAILED, "200 stream error: prefill server failed: connection lost"
    )  # fmt: skip


def test_failures_differing_only_in_numbers_share_a_reason():
    a = reason_key("504 timed out after 30.0s waiting for the KV of room 123")
    b = reason_key("504 timed out after 30.0s waiting for the KV of room 98765")
    assert a == b and "room N" in a


def test_fault_sequence_is_the_same_for_the_same_seed():
    def draw(seed):
        rng = random.Random(seed)
        return [next_fault(rng, list(FAULT_KINDS), ["p0", "d0"], (1, 2), (0, 1)) for _ in range(5)]

    assert draw(3) == draw(3) and draw(3) != draw(4)


def record(started_s, elapsed_s, outcome, reason=""):
    return RequestRecord(0, 0, started_s, elapsed_s, 200 if outcome == OK else 503, outcome, reason)


def test_recovery_is_the_first_success_of_a_request_sent_after_the_fault():
    records = [record(0.0, 9.0, OK), record(5.0, 1.0, FAILED, "x"), record(6.0, 1.5, OK)]
    assert recovery_s(4.0, records) == 3.5  # not the one sent before the fault
    assert recovery_s(7.0, records) is None


def test_summary_fails_on_lost_wrong_leaks_orphans_and_undetected_faults():
    clean = summarize([record(0, 1, OK)], [], {"p": {"pages": 0, "rooms": 0}}, [], 0.1)
    assert clean.passed, clean.problems
    fault = FaultRecord("kill_worker", "p", 1.0, 0.5, note="still healthy")
    bad = summarize(
        [record(0, 1, OK), record(1, 2, LOST), record(2, 1, WRONG), record(3, 4, FAILED, "503 a 1")],
        [fault], {"p": {"pages": 3, "rooms": 0}}, ["pid 7 (python)"], None,
    )  # fmt: skip
    assert len(bad.problems) == 5, bad.problems
    assert bad.failures_by_reason == {"503 a N": {"count": 1, "max_elapsed_s": 4}}
    assert bad.slowest_failure_s == 4
    assert "FAIL" in render_text(bad) and "PASS" in render_text(clean)
