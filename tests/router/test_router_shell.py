"""The router process against scripted stub workers: what it sends, how it streams, and
what it does when a leg fails, hangs, dies or the client leaves."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import requests

from tests.helpers import REPO_ROOT, free_port, python_path_env, wait_until
from tests.router.conftest import router_args

pytestmark = pytest.mark.timeout(120)


def stub_stream(url: str, script: dict) -> requests.Response:
    """A streamed /generate the stubs answer by `script` (use it as a context manager)."""
    body = {"text": "x", "stream": True, "stub": script}
    return requests.post(f"{url}/generate", json=body, stream=True, timeout=10)


def leave_after_first_event(url: str, script: dict) -> None:
    """`stub_stream`, which the client hangs up on after its first event."""
    with stub_stream(url, script) as resp:
        next(line for line in resp.iter_lines() if line)


def pd_args(stubs, prefills=("p1",), decodes=("d1",), bootstrap_port=8998):
    return router_args(
        prefills=[(stubs[p].url, bootstrap_port) for p in prefills],
        decodes=[stubs[d].url for d in decodes],
    )


def sse_events(resp: requests.Response) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def metric(router, name: str, **labels) -> float:
    text = requests.get(f"{router.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_both_legs_get_the_same_body_with_bootstrap_fields(stubs, router_factory):
    router = router_factory(pd_args(stubs, bootstrap_port=8998))
    resp = requests.post(
        f"{router.url}/generate", json={"text": "hi", "bootstrap_room": 1}, timeout=10
    )
    assert resp.status_code == 200 and resp.json()["meta_info"]["worker"] == "d1"
    (prefill,), (decode,) = stubs["p1"].log()["bodies"], stubs["d1"].log()["bodies"]
    assert prefill == decode
    assert prefill["bootstrap_host"] == "127.0.0.1" and prefill["bootstrap_port"] == 8998
    assert prefill["bootstrap_room"] != 1 and 0 <= prefill["bootstrap_room"] < 2**63
    assert prefill["rid"].startswith("pdr-") and prefill["text"] == "hi"


def test_batches_and_n_get_one_room_per_sequence(stubs, router_factory):
    router = router_factory(pd_args(stubs))
    requests.post(f"{router.url}/generate", json={"input_ids": [[1, 2], [3]]}, timeout=10)
    requests.post(
        f"{router.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "n": 3},
        timeout=10,
    )
    requests.post(f"{router.url}/v1/completions", json={"prompt": ["a", "b"], "n": 2}, timeout=10)
    bodies = stubs["d1"].log()["bodies"]
    assert [len(b["bootstrap_room"]) for b in bodies] == [2, 3, 4]
    assert all(len(set(b["bootstrap_room"])) == len(b["bootstrap_room"]) for b in bodies)
    assert all(len(b["rid"]) == len(b["bootstrap_room"]) for b in bodies)
    assert bodies[1]["bootstrap_port"] == [8998] * 3


def test_decode_tokens_are_streamed_while_prefill_has_not_answered(stubs, router_factory):
    """SGLang's router 0.3.2 waits for prefill's whole body; ours must not."""
    router = router_factory(pd_args(stubs))
    script = {"p1": {"hold": "prefill-answer"}, "d1": {"chunks": 3, "hold_after_first": "more"}}
    with requests.post(
        f"{router.url}/generate",
        json={"text": "x", "stream": True, "stub": script},
        stream=True,
        timeout=(5, 20),
    ) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[6:])["text"] == "from d1 0"  # prefill and decode still held
        stubs["d1"].release("more")
        rest = [json.loads(line[6:]) for line in lines if line and line != b"data: [DONE]"]
        assert [e["text"] for e in rest] == ["from d1 1", "from d1 2"]
    stubs["p1"].release("prefill-answer")


def test_prompt_logprobs_of_prefill_lead_decode_ones(stubs, router_factory):
    router = router_factory(pd_args(stubs))
    lps = [[None, 7, None], [-0.5, 8, None]]
    body = {"text": "x", "return_logprob": True, "stub": {"p1": {"prompt_lps": lps}}}
    whole = requests.post(f"{router.url}/generate", json=body, timeout=10).json()
    assert whole["meta_info"]["input_token_logprobs"] == lps
    with requests.post(
        f"{router.url}/generate", json={**body, "stream": True}, stream=True, timeout=10
    ) as resp:
        events = sse_events(resp)
    assert len(events) == 2
    assert all(e["meta_info"]["input_token_logprobs"] == lps for e in events)


def test_failed_prefill_is_retried_on_another_pair_with_new_rooms(stubs, router_factory):
    router = router_factory(
        pd_args(stubs, prefills=("p1", "p2"), decodes=("d1",)) + ["--retry-backoff-s", "0.01"]
    )
    # d1 answers late, as a real decode server does (it needs prefill's KV first)
    body = {"text": "x", "stub": {"p1": {"status": 503}, "d1": {"delay_s": 0.3}}}
    for _ in range(2):
        resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
        assert resp.status_code == 200 and resp.json()["meta_info"]["worker"] == "d1"
    # (d1 may never see a failed attempt's leg: it is cancelled as soon as p1 fails)
    failed, ok = stubs["p1"].log()["bodies"], stubs["p2"].log()["bodies"]
    assert len(ok) == 2 and len(failed) >= 1
    rooms = [b["bootstrap_room"] for b in failed + ok]
    assert len(set(rooms)) == len(rooms)  # every attempt drew a fresh room
    assert metric(router, "pdserve_router_retries_total") == len(failed)
    assert metric(
        router, "pdserve_router_worker_failures_total", worker=stubs["p1"].url, reason="http_503"
    ) == len(failed)


def test_prefill_error_aborts_decode_at_once_and_reaches_the_client(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--max-retries", "0"])
    body = {"text": "x", "stub": {"p1": {"status": 400}, "d1": {"hold": "never"}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["message"] == "p1 scripted failure"  # the worker's words, no address first
    assert error["worker"] == {"url": stubs["p1"].url, "role": "prefill"}
    rid = stubs["d1"].log()["bodies"][0]["rid"]
    wait_until(lambda: stubs["d1"].log()["aborts"] == [rid], 5, "decode abort")
    wait_until(lambda: stubs["d1"].log()["disconnects"] == 1, 5, "decode connection closed")


@pytest.mark.parametrize("status", [400, 503])
def test_decode_error_aborts_prefill_at_once_and_reaches_the_client(stubs, router_factory, status):
    """No leg may wait after the other failed: a decode that refuses the request at once (a
    bad bootstrap_host or port, which also keeps it from telling prefill itself) ends the
    prefill leg, which would otherwise hold its room until --bootstrap-timeout-s."""
    router = router_factory(pd_args(stubs) + ["--max-retries", "0"])
    body = {"text": "x", "stub": {"p1": {"hold": "never"}, "d1": {"status": status}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == status
    assert resp.json()["error"]["worker"] == {"url": stubs["d1"].url, "role": "decode"}
    rid = stubs["p1"].log()["bodies"][0]["rid"]
    wait_until(lambda: stubs["p1"].log()["aborts"] == [rid], 5, "prefill abort")
    wait_until(lambda: stubs["p1"].log()["disconnects"] == 1, 5, "prefill connection closed")
    assert metric(router, "pdserve_router_aborts_total", role="prefill", cause="decode_failed") == 1


def test_a_4xx_from_a_worker_is_the_clients_error_not_a_failed_attempt(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--retry-backoff-s", "0.01"])
    refused = {"text": "x", "stub": {"d1": {"status": 422}}}
    resp = requests.post(f"{router.url}/generate", json=refused, timeout=10)
    assert resp.status_code == 422 and resp.json()["error"]["message"] == "d1 scripted failure"
    assert len(stubs["d1"].log()["bodies"]) == 1  # not retried
    assert metric(router, "pdserve_router_retries_total") == 0
    assert metric(router, "pdserve_router_worker_failures_total") == 0
    assert "failed" not in router.output()  # no WARNING "attempt 1 of /generate failed"
    failing = {"text": "x", "stub": {"d1": {"status": 503}}}
    resp = requests.post(f"{router.url}/generate", json=failing, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["message"] == "d1 scripted failure"
    assert metric(router, "pdserve_router_retries_total") == 3
    log = router.output()
    assert f"WARNING attempt 1 of /generate failed: decode {stubs['d1'].url}: d1 scripted" in log
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "closed"


def test_decode_death_mid_stream_ends_the_stream_with_an_error_and_aborts_prefill(
    stubs, router_factory
):
    router = router_factory(pd_args(stubs))
    script = {
        "p1": {"hold": "never"},
        "d1": {"chunks": 5, "hold_after_first": "go", "die_after": 2},
    }
    with stub_stream(router.url, script) as resp:
        lines = (line for line in resp.iter_lines() if line)
        assert json.loads(next(lines)[6:])["text"] == "from d1 0"
        stubs["d1"].release("go")  # now it dies
        last = json.loads(list(lines)[-1][6:])
    assert last["error"]["message"].startswith("decode server failed: connection lost")
    assert last["error"]["code"] == 502 and last["error"]["worker"]["url"] == stubs["d1"].url
    assert last["error"]["type"] == "server_error" and last["error"]["param"] is None
    rid = stubs["p1"].log()["bodies"][0]["rid"]
    wait_until(lambda: stubs["p1"].log()["aborts"] == [rid], 5, "prefill abort")


def test_client_leaving_mid_stream_aborts_both_legs(stubs, router_factory):
    router = router_factory(pd_args(stubs))
    script = {"p1": {"hold": "never"}, "d1": {"chunks": 3, "hold_after_first": "never"}}
    leave_after_first_event(router.url, script)
    rid = stubs["d1"].log()["bodies"][0]["rid"]
    wait_until(lambda: stubs["d1"].log()["aborts"] == [rid], 5, "decode abort")
    wait_until(lambda: stubs["p1"].log()["aborts"] == [rid], 5, "prefill abort")
    wait_until(
        lambda: metric(router, "pdserve_router_aborts_total", cause="client_disconnect") == 2,
        5,
        "abort metrics",
    )


def test_a_client_hanging_up_after_the_last_event_completed_its_request(stubs, router_factory):
    """OpenAI clients and `pdserve bench` hang up once they read `data: [DONE]`, which can be
    before decode's end of body reaches the router: the router must end the client's answer
    at that event, not count a disconnect and abort decode."""
    router = router_factory(pd_args(stubs))
    body = json.dumps({"text": "x", "stream": True, "stub": {"d1": {"hold_end": "end"}}})
    request = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"data: [DONE]\n\n\r\n0\r\n\r\n" not in received:  # a timeout fails the test
            received += sock.recv(65536)
    stubs["d1"].release("end")  # decode's body ends after the client left
    assert metric(router, "pdserve_router_request_duration_seconds_count") == 1
    assert metric(router, "pdserve_router_request_failures_total") == 0
    assert metric(router, "pdserve_router_aborts_total") == 0
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok
    assert stubs["d1"].log()["aborts"] == [] and stubs["p1"].log()["aborts"] == []


def test_client_giving_up_on_a_whole_answer_aborts_both_legs(stubs, router_factory):
    router = router_factory(pd_args(stubs))
    body = {"text": "x", "stub": {"p1": {"hold": "never"}, "d1": {"hold": "never"}}}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{router.url}/generate", json=body, timeout=(5, 1))
    rid = stubs["d1"].log()["bodies"][0]["rid"]
    wait_until(lambda: stubs["d1"].log()["aborts"] == [rid], 5, "decode abort")
    wait_until(lambda: stubs["p1"].log()["aborts"] == [rid], 5, "prefill abort")


def test_a_hung_decode_meets_the_request_deadline(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--request-timeout-s", "1"])
    body = {"text": "x", "stub": {"d1": {"hold": "never"}}}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 504
    assert "deadline" in resp.json()["error"]["message"]


def test_a_stream_cut_by_the_request_deadline_leaves_decode_in_rotation(stubs, router_factory):
    """The router's own deadline ends a stream decode is still sending: the request's time
    ran out, the server did nothing wrong, so its breaker (one failure opens it here) stays
    closed; it used to open, and a sound decode server took no request for --cb-open-s."""
    args = ["--request-timeout-s", "1", "--cb-failure-threshold", "1", "--max-retries", "0"]
    router = router_factory(pd_args(stubs) + args)
    script = {"d1": {"chunks": 3, "hold_after_first": "never"}}
    body = {"text": "x", "stream": True, "stub": script}
    with requests.post(f"{router.url}/generate", json=body, stream=True, timeout=10) as resp:
        events = [line for line in resp.iter_lines() if line]
    assert "deadline" in events[-1].decode(), events
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "closed"
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok


def test_unhealthy_worker_leaves_rotation_and_comes_back(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--health-failure-threshold", "1"])
    stubs["d1"].control(health_status=503)
    wait_until(
        lambda: requests.get(f"{router.url}/readiness").status_code == 503, 10, "router not ready"
    )
    resp = requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10)
    assert resp.status_code == 503 and "no healthy decode" in resp.json()["error"]["message"]
    stubs["d1"].control(health_status=200)
    wait_until(
        lambda: requests.get(f"{router.url}/readiness").status_code == 200, 10, "router ready again"
    )
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok


def test_circuit_breaker_opens_after_repeated_failures(stubs, router_factory):
    router = router_factory(
        pd_args(stubs) + ["--max-retries", "0", "--cb-failure-threshold", "2", "--cb-open-s", "60"]
    )
    body = {"text": "x", "stub": {"d1": {"status": 500}}}
    assert [
        requests.post(f"{router.url}/generate", json=body, timeout=10).status_code for _ in range(3)
    ] == [500, 500, 503]
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "open"
    assert workers[stubs["p1"].url]["circuit"] == "closed"  # the healthy leg is not blamed


def test_a_504_a_worker_answers_never_opens_its_breaker(stubs, router_factory):
    """A server's 504 is a deadline it enforced on the request (its --request-timeout-s, a
    bootstrap or KV wait): it is responsive. Counted, a few requests longer than the servers'
    deadline took a sound server out, and every request got 503 for --cb-open-s."""
    router = router_factory(
        pd_args(stubs) + ["--max-retries", "0", "--cb-failure-threshold", "1", "--cb-open-s", "60"]
    )
    late = {"d1": {"status": 504, "delay_s": 0.2}}  # after prefill's leg ended
    for script in (late, {"p1": {"status": 504}, "d1": {"hold": "never"}}):
        resp = requests.post(f"{router.url}/generate", json={"text": "x", "stub": script})
        assert resp.status_code == 504, resp.text
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "closed"
    assert workers[stubs["p1"].url]["circuit"] == "closed"
    assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok


def test_client_errors_never_open_a_breaker(stubs, router_factory):
    """A 4xx is the request's fault: garbage from clients must not take a server out."""
    router = router_factory(
        pd_args(stubs) + ["--max-retries", "0", "--cb-failure-threshold", "2", "--cb-open-s", "60"]
    )
    body = {"text": "x", "stub": {"d1": {"status": 400}, "p1": {"status": 400}}}
    assert [
        requests.post(f"{router.url}/generate", json=body, timeout=10).status_code for _ in range(4)
    ] == [400] * 4
    workers = {w["url"]: w for w in requests.get(f"{router.url}/workers").json()["workers"]}
    assert workers[stubs["d1"].url]["circuit"] == "closed"
    assert workers[stubs["p1"].url]["circuit"] == "closed"


def test_workers_can_be_added_and_removed_at_runtime(stubs, router_factory):
    router = router_factory(pd_args(stubs))
    added = requests.post(
        f"{router.url}/workers", json={"url": stubs["d2"].url, "role": "decode"}, timeout=10
    )
    assert added.status_code == 200 and added.json()["dp_size"] == 4
    bad = requests.post(
        f"{router.url}/workers", json={"url": "http://127.0.0.1:9", "role": "decode"}, timeout=10
    )
    assert bad.status_code == 502 and "did not answer" in bad.json()["error"]["message"]
    for _ in range(4):
        requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10)
    assert len(stubs["d1"].log()["bodies"]) == 2 and len(stubs["d2"].log()["bodies"]) == 2
    removed = requests.delete(f"{router.url}/workers", params={"url": stubs["d2"].url})
    assert removed.status_code == 200
    requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10)
    assert len(stubs["d2"].log()["bodies"]) == 2
    listed = requests.get(f"{router.url}/workers").json()["workers"]
    assert sorted(w["url"] for w in listed) == sorted([stubs["p1"].url, stubs["d1"].url])


@pytest.mark.parametrize(
    ("method", "body", "needle"),
    [
        ("POST", {"url": 5, "role": "decode"}, "URL must be a string"),
        ("POST", {"url": None, "role": "decode"}, "URL must be a string"),
        ("POST", {"url": "http://127.0.0.1:9", "role": "prefill", "bootstrap_port": True},
         "bootstrap port must be an integer"),
        ("POST", {"url": "http://127.0.0.1:9", "role": "prefill", "bootstrap_port": 80.0},
         "bootstrap port must be an integer"),
        ("DELETE", {"url": 5}, "url must be a string"),
        ("DELETE", {"url": ["http://127.0.0.1:9"]}, "url must be a string"),
    ],
)  # fmt: skip
def test_worker_admin_bodies_of_the_wrong_type_are_a_400(
    stubs, router_factory, method, body, needle
):
    router = router_factory(pd_args(stubs))
    resp = requests.request(method, f"{router.url}/workers", json=body, timeout=10)
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"], resp.text
    listed = requests.get(f"{router.url}/workers", timeout=10).json()["workers"]
    assert sorted(w["url"] for w in listed) == sorted([stubs["p1"].url, stubs["d1"].url])


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_worker_admin_bodies_nested_too_deeply_are_a_400(stubs, router_factory, method):
    router = router_factory(pd_args(stubs))
    body = b"[" * 100_000 + b"]" * 100_000
    resp = requests.request(method, f"{router.url}/workers", data=body, timeout=10)
    assert resp.status_code == 400 and "nested too deeply" in resp.text, resp.text


def test_dp_aware_sets_ranks_from_each_servers_dp_size(stubs, router_factory):
    router = router_factory(pd_args(stubs, decodes=("d2",)) + ["--dp-aware"])
    for _ in range(8):
        assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok
    prefills, decodes = stubs["p1"].log()["bodies"], stubs["d2"].log()["bodies"]
    for p, d in zip(prefills, decodes, strict=True):
        assert p["routed_dp_rank"] == p["disagg_prefill_dp_rank"] == d["disagg_prefill_dp_rank"]
        assert p["bootstrap_room"] == d["bootstrap_room"]
    assert {p["routed_dp_rank"] for p in prefills} == {0, 1}
    assert {d["routed_dp_rank"] for d in decodes} == {0, 1, 2, 3}


def test_align_room_puts_each_room_on_a_prefill_rank_without_rank_fields(stubs, router_factory):
    router = router_factory(pd_args(stubs) + ["--align-room"])

    def legs_in_flight() -> int:
        workers = requests.get(f"{router.url}/workers", timeout=10).json()["workers"]
        return sum(w["in_flight"] for w in workers)

    for _ in range(6):
        assert requests.post(f"{router.url}/generate", json={"text": "x"}, timeout=10).ok
        # The rank goes to the fewest legs in flight, ties in turn; a prefill leg may end
        # after the answer: with none left in flight the next rank is the other one.
        wait_until(lambda: legs_in_flight() == 0, 10, "the prefill leg to end")
    bodies = stubs["p1"].log()["bodies"]
    assert [b["bootstrap_room"] % 2 for b in bodies] == [0, 1] * 3  # ranks in turn
    assert not any("routed_dp_rank" in b for b in bodies)


def test_get_load_and_health_generate_ask_the_workers(stubs, router_factory):
    router = router_factory(pd_args(stubs, decodes=("d2",)))
    stubs["d2"].control(load_tokens=7)
    loads = requests.get(f"{router.url}/get_load", timeout=10).json()["workers"]
    assert {(w["url"], w["role"]): w["load"] for w in loads} == {
        (stubs["p1"].url, "prefill"): [{"num_tokens": 0}] * 2,
        (stubs["d2"].url, "decode"): [{"num_tokens": 7}] * 4,
    }
    assert requests.get(f"{router.url}/health_generate", timeout=10).status_code == 200
    stubs["d2"].control(health_generate_status=500)
    resp = requests.get(f"{router.url}/health_generate", timeout=10)
    assert resp.status_code == 503
    message = resp.json()["error"]["message"]
    assert (
        message == "health_generate failed: decode server answered /health_generate with HTTP 500"
    )


def test_bad_requests_and_side_routes(stubs, router_factory):
    metrics_port = free_port()
    router = router_factory(pd_args(stubs) + ["--prometheus-port", str(metrics_port)])
    resp = requests.post(f"{router.url}/generate", data=b"{not json", timeout=10)
    assert resp.status_code == 400 and "bad request" in resp.json()["error"]["message"]
    resp = requests.post(
        f"{router.url}/v1/chat/completions", data=b"[" * 3000 + b"]" * 3000, timeout=10
    )
    assert resp.status_code == 400 and "recursion" in resp.json()["error"]["message"]
    resp = requests.post(f"{router.url}/v1/completions", json={"prompt": []}, timeout=10)
    assert resp.status_code == 400
    resp = requests.post(f"{router.url}/v1/completions", json={"prompt": "a", "n": 0}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n", resp.text
    body = {"text": "x", "disagg_local_prefill": True}
    resp = requests.post(f"{router.url}/generate", json=body, timeout=10)
    assert resp.status_code == 400 and "set by the router" in resp.json()["error"]["message"]
    assert requests.get(f"{router.url}/v1/models").json()["data"][0]["id"] == "model-of-d1"
    assert requests.get(f"{router.url}/health").ok
    info = requests.get(f"{router.url}/server_info").json()
    assert info["role"] == "router" and len(info["workers"]) == 2
    assert metric(router, "pdserve_router_requests_total", route="/generate") == 2
    side = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert (
        'pdserve_router_request_failures_total{reason="bad_request",route="/generate"} 2.0' in side
    )


@pytest.mark.parametrize("flag", ["--port", "--prometheus-port"])
def test_a_taken_port_fails_the_start_with_a_message_not_a_traceback(stubs, flag):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = {"--port": str(free_port()), flag: str(port)}
        args = [arg for item in ports.items() for arg in item] + pd_args(stubs)
        done = subprocess.run(
            [sys.executable, "-m", "pdserve", "router", *args],
            cwd=REPO_ROOT, env=python_path_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    # It said only "error while attempting to bind on address", as if of either port.
    assert f"pdserve router: failed to start: {flag} {port}: cannot listen on" in done.stderr
    assert "Traceback" not in done.stderr
