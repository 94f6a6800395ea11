"""A prefill server stopped whole (SIGSTOP) while a room's two legs arrive: decode fails its
leg when the KV heartbeat lapses, and the prefill leg must end with that failure soon after
prefill runs again. Decode told prefill's bootstrap server once, with a 2 s timeout, so a
server stopped longer never heard it: the prefill leg held its request for the whole
--bootstrap-timeout-s (seen in the chaos soak as requests stuck for 33 s). Decode's failure
was prefill's fault (`origin: prefill`), so prefill's leg must not blame decode for it."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import requests

from tests.disagg.pd_driver import pd_generate, wait_idle
from tests.helpers import wait_until

BODY = {"input_ids": list(range(3, 40)), "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
DEADLINE_S = 120  # prefill's bootstrap deadline: far past every wait below


def _leg(bootstrap_port: int, room: int, rid: str) -> dict:
    return {
        **BODY,
        "rid": rid,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": room,
    }


def _post(url: str, body: dict) -> requests.Response:
    return requests.post(url + "/generate", json=body, timeout=DEADLINE_S + 30)


def test_a_room_decode_failed_while_prefill_was_stopped_ends_once_prefill_runs(pd):
    long = ["--bootstrap-timeout-s", str(DEADLINE_S)]
    prefill = pd.prefill(1, long)
    decode = pd.decode(1, [*long, "--heartbeat-timeout-s", "1"])
    port = prefill.bootstrap_port
    warm = dict(BODY, bootstrap_room=9001)  # the KV connection and handshake exist
    assert pd_generate(prefill.url, decode.url, warm, bootstrap_port=port).decode.ok
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        prefill.server.signal_group(signal.SIGSTOP)
        try:
            decode_leg = pool.submit(_post, decode.url, _leg(port, 9002, "d"))
            prefill_leg = pool.submit(_post, prefill.url, _leg(port, 9002, "p"))
            answer = decode_leg.result(timeout=30)
            assert answer.status_code == 503, answer.text
            assert "lost the connection to prefill" in answer.json()["error"]["message"]
            assert answer.json()["error"].get("origin") == "prefill", answer.text
            # Not a synchronisation: the test is a stop longer than one try to tell prefill.
            until = time.monotonic() + 4
            wait_until(lambda: time.monotonic() > until, 10, "the stop")
        finally:
            prefill.server.signal_group(signal.SIGCONT)
        answer = prefill_leg.result(timeout=DEADLINE_S / 3)  # not its deadline
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["message"].startswith("decode failed the room"), answer.text
    assert "origin" not in answer.json()["error"], answer.text  # the fault is prefill's own
    wait_idle([prefill.url, decode.url], timeout_s=30)
