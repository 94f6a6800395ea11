"""The worker watchdog (--watchdog-timeout) on a PD pair, real processes: a prefill worker
stuck in one long prefill is declared stuck like a colocated one, and the decode worker whose
room waits all that time for its KV (with a watchdog as tiny) is not: its loop turns while it
waits, and progress is the loop turning, not tokens coming out."""

from __future__ import annotations

from tests.disagg.pd_driver import pd_generate, wait_idle
from tests.helpers import http_json, wait_until
from tests.serving.test_worker_watchdog import LONG_ARGS, long_prompt

# Past the seconds the long prefill takes: decode waits for its KV, not for a deadline.
PATIENT = ["--bootstrap-timeout-s", "300", "--kv-wait-timeout-s", "300"]
BODY = {"sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}}


def _healthy(url: str) -> bool:
    return http_json("GET", f"{url}/health")[0] == 200


def test_a_prefill_worker_stuck_in_one_long_prefill_is_declared_stuck(pd):
    prefill = pd.prefill(1, [*LONG_ARGS, *PATIENT])
    decode = pd.decode(1, [*LONG_ARGS, *PATIENT])
    body = {**BODY, "input_ids": long_prompt()}
    result = pd_generate(
        prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port, timeout_s=300
    )
    assert result.prefill.status == 503, result.prefill.body
    assert "dp worker 0 is not responding (no progress for" in result.prefill.error
    assert "its stacks follow" in prefill.server.output()
    # Decode's room waited all along for its KV or for prefill's word that the room failed
    # (prefill's loop takes the abort once its step ends), and decode is not blamed.
    assert result.decode.ok or result.decode.body["error"]["origin"] == "prefill", result.decode
    assert "no progress" not in decode.output()
    assert _healthy(decode.url)
    wait_until(lambda: _healthy(prefill.url), 120, "prefill's loop to turn again")
    wait_idle([prefill.url, decode.url], timeout_s=60)
