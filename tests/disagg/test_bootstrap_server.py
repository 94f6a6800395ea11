"""Bootstrap server over real HTTP: a `python -m pdserve.disagg.bootstrap_server` process on a
free loopback port, driven with raw HTTP requests (routes, garbage matrix)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from pdserve.disagg.bootstrap_client import register_worker_blocking
from pdserve.disagg.bootstrap_registry import MAX_ROOMS_PER_QUERY, WorkerRegistration
from tests.disagg.bootstrap_fixtures import registration
from tests.helpers import (
    free_port,
    python_path_env,
    raw_exchange,
    send_part_and_leave,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 15.0


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, object]:
    """One HTTP request; the answer's status and JSON body (None if the body is not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = headers or ({"Content-Type": "application/json"} if body is not None else {})
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, None


def post(port: int, path: str, data: object) -> tuple[int, object]:
    return request(port, "POST", path, json.dumps(data).encode())


def wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"bootstrap server exited with {proc.returncode}"
        try:
            if request(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)  # polling interval of a deadline-bounded readiness wait
    raise TimeoutError(f"bootstrap server on port {port} not healthy in {STARTUP_TIMEOUT_S}s")


def start_server_process(
    port: int, dp_size: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {**python_path_env(), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pdserve.disagg.bootstrap_server", "--host", "127.0.0.1",
         "--port", str(port), "--dp-size", str(dp_size)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def server_port() -> Iterator[int]:
    """A fresh bootstrap server process expecting dp_size 2; stopped even on failure."""
    port = free_port()
    proc = start_server_process(port, dp_size=2)
    try:
        wait_healthy(port, proc)
        yield port
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def ready_port() -> Iterator[int]:
    """One server shared by the garbage matrix: both workers registered, room 1 -> rank 1."""
    port = free_port()
    proc = start_server_process(port, dp_size=2)
    try:
        wait_healthy(port, proc)
        for rank in range(2):
            register_worker_blocking(f"http://127.0.0.1:{port}", registration(rank), 5.0)
        assert post(port, "/register_dp_rank", {"bootstrap_room": 1, "dp_rank": 1})[0] == 200
        yield port
    finally:
        stop_process(proc)


def put_worker(port: int, reg: WorkerRegistration) -> tuple[int, object]:
    return request(port, "PUT", "/route", msgspec.json.encode(reg))


def test_server_info_is_503_until_all_workers_registered(server_port):
    status, body = request(server_port, "GET", "/route")
    assert status == 503 and "no prefill worker" in body["error"]["message"]
    assert put_worker(server_port, registration(1)) == (200, {"ok": True})
    status, body = request(server_port, "GET", "/route")
    assert status == 503 and "1 of 2" in body["error"]["message"]
    assert "dp_rank=0" in body["error"]["message"]
    assert put_worker(server_port, registration(0))[0] == 200
    status, info = request(server_port, "GET", "/route")
    assert status == 200
    assert info["dp_size"] == 2 and info["page_size"] == 16
    assert info["follow_bootstrap_room"] is False and info["registers_all_rooms"] is True


def test_worker_lookup_answers_endpoint_404_and_400(server_port):
    assert put_worker(server_port, registration(1))[0] == 200
    status, worker = request(server_port, "GET", "/route?prefill_dp_rank=1")
    assert status == 200 and worker["kv_endpoint"] == "tcp://127.0.0.1:6001"
    assert worker["model_fingerprint"] == "model-a"
    status, body = request(server_port, "GET", "/route?prefill_dp_rank=0")
    assert status == 404 and "dp_rank 0" in body["error"]["message"]
    assert request(server_port, "GET", "/route?prefill_dp_rank=x")[0] == 400


def test_restarted_worker_replaces_its_endpoint(server_port):
    assert put_worker(server_port, registration(0))[0] == 200
    assert put_worker(server_port, registration(0, kv_endpoint="tcp://127.0.0.1:9"))[0] == 200
    assert request(server_port, "GET", "/route")[0] == 503  # rank 1 still missing
    _, worker = request(server_port, "GET", "/route?prefill_dp_rank=0")
    assert worker["kv_endpoint"] == "tcp://127.0.0.1:9"


def test_a_registration_whose_kv_endpoint_decode_cannot_connect_to_is_400(server_port):
    body = msgspec.json.encode(registration(0)).replace(b"127.0.0.1:6000", b"127.0.0.1")
    status, answer = request(server_port, "PUT", "/route", body)
    assert status == 400, answer
    assert "kv_endpoint" in answer["error"]["message"], answer
    assert "tcp://host:port" in answer["error"]["message"], answer
    assert request(server_port, "GET", "/route?prefill_dp_rank=0")[0] == 404


def test_contradicting_registration_is_400_naming_both_values(server_port):
    assert put_worker(server_port, registration(0))[0] == 200
    status, body = put_worker(server_port, registration(1, page_size=32))
    assert status == 400
    assert "page_size" in body["error"]["message"]
    assert "16" in body["error"]["message"] and "32" in body["error"]["message"]


def test_rooms_register_query_and_fail_over_http(server_port):
    assert post(server_port, "/register_dp_rank", {"bootstrap_room": 10, "dp_rank": 1})[0] == 200
    assert post(server_port, "/register_dp_rank", {"bootstrap_room": "11", "dp_rank": 0})[0] == 200
    failure = {"bootstrap_room": 12, "error": "follow_bootstrap_room conflict", "status": 400}
    assert post(server_port, "/register_dp_rank", failure)[0] == 200
    big = 2**63 - 1
    assert post(server_port, "/register_dp_rank", {"bootstrap_room": big, "dp_rank": 1})[0] == 200
    status, answer = post(
        server_port, "/query_dp_ranks", {"bootstrap_rooms": [10, "11", 12, 13, str(big)]}
    )
    assert status == 200
    assert answer == {
        "10": 1,
        "11": 0,
        "12": {"error": "follow_bootstrap_room conflict", "status": 400},
        str(big): 1,
    }


def test_a_failure_says_whose_fault_it_is_and_a_bad_origin_is_a_clear_400(server_port):
    """Decode's report of a room it failed names the side at fault (`origin`), which the
    prefill leg of the room reads; a failure without one answers as before."""
    for room, origin in ((20, "decode"), (21, "prefill")):
        failure = {"bootstrap_room": room, "error": "decode failed the room: x", "origin": origin}
        assert post(server_port, "/register_dp_rank", failure)[0] == 200
    status, answer = post(server_port, "/query_dp_ranks", {"bootstrap_rooms": [20, 21]})
    assert status == 200 and answer == {
        "20": {"error": "decode failed the room: x", "status": 500, "origin": "decode"},
        "21": {"error": "decode failed the room: x", "status": 500, "origin": "prefill"},
    }
    for bad in ("router", "", "DECODE"):
        failure = {"bootstrap_room": 22, "error": "x", "origin": bad}
        status, answer = post(server_port, "/register_dp_rank", failure)
        assert status == 400, answer
        assert 'origin must be "decode" or "prefill"' in answer["error"]["message"]
    with_rank = {"bootstrap_room": 22, "dp_rank": 0, "origin": "decode"}
    status, answer = post(server_port, "/register_dp_rank", with_rank)
    assert status == 400 and "origin goes with error" in answer["error"]["message"], answer
    assert post(server_port, "/query_dp_ranks", {"bootstrap_rooms": [22]}) == (200, {})


REG = msgspec.to_builtins(registration(0))
GARBAGE = [
    ("PUT", "/route", b"not json"),
    ("PUT", "/route", b""),
    ("PUT", "/route", b"[]"),
    ("PUT", "/route", b"{}"),
    ("PUT", "/route", b"[" * 100_000),
    ("PUT", "/route", json.dumps({**REG, "dp_rank": True}).encode()),
    ("PUT", "/route", json.dumps({**REG, "page_size": "16"}).encode()),
    ("PUT", "/route", json.dumps({**REG, "dp_rank": 5}).encode()),
    ("PUT", "/route", json.dumps({**REG, "dp_rank": 2**70}).encode()),
    ("PUT", "/route", json.dumps({**REG, "page_size": 32}).encode()),
    ("PUT", "/route", json.dumps({**REG, "dp_size": 3}).encode()),
    ("PUT", "/route", json.dumps({**REG, "typo_field": 1}).encode()),
    ("GET", "/route?prefill_dp_rank=abc", None),
    ("GET", "/route?prefill_dp_rank=-1", None),
    ("GET", "/route?prefill_dp_rank=1.5", None),
    ("GET", "/route?prefill_dp_rank=", None),
    ("GET", "/route?prefill_dp_rank=99999999999999999999999", None),
    ("GET", "/route?prefill_dp_rank=7", None),
    ("POST", "/register_dp_rank", b"{"),
    ("POST", "/register_dp_rank", b'{"unknown": ' + b"[" * 100_000),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": {"a": 1}, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b"{}"),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": -1, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 9223372036854775808, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 1e30, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": true, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 1.5, "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": " 12", "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": "1_0", "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": "-3", "dp_rank": 0}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "dp_rank": 2}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "dp_rank": true}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "dp_rank": 0, "error": "x"}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "error": "x", "status": 200}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "error": ""}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "error": "x", "origin": 1}'),
    ("POST", "/register_dp_rank", b'{"bootstrap_room": 3, "error": "x", "origin": "router"}'),
    ("POST", "/query_dp_ranks", b"nope"),
    ("POST", "/query_dp_ranks", b"{}"),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": 5}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [-1]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [true]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [null]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [[1]]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": ["x"]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [9223372036854775808]}'),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": ["99999999999999999999"]}'),
    ("POST", "/query_dp_ranks", json.dumps({"bootstrap_rooms": [1] * (MAX_ROOMS_PER_QUERY + 1)}).encode()),
    ("POST", "/query_dp_ranks", b'{"bootstrap_rooms": [' + b"1," * 600_000 + b"1]}"),
    ("DELETE", "/route", None),
    ("GET", "/query_dp_ranks", None),
    ("GET", "/no_such_route", None),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body"), GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_4xx_and_server_keeps_answering(ready_port, method, path, body):
    status, answer = request(ready_port, method, path, body)
    assert 400 <= status < 500, (status, answer)
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    assert request(ready_port, "GET", "/health") == (200, {"status": "ok"})
    assert post(ready_port, "/query_dp_ranks", {"bootstrap_rooms": [1, 2]}) == (200, {"1": 1})
    status, info = request(ready_port, "GET", "/route")
    assert status == 200 and info["page_size"] == 16 and info["dp_size"] == 2


def test_an_oversized_or_unfinished_body_is_answered_not_waited_for(ready_port):
    url = f"http://127.0.0.1:{ready_port}"
    head = b"POST /query_dp_ranks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Declared past the 1 MiB limit: refused at once, not after the bytes that never come.
    answer = raw_exchange(url, head + b"Content-Length: 1000000000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # Declared 100 bytes, sent 1: refused at the body deadline, not held forever.
    answer = raw_exchange(url, head + b"Content-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"not complete within" in answer
    assert post(ready_port, "/query_dp_ranks", {"bootstrap_rooms": [1, 2]}) == (200, {"1": 1})


def test_a_body_that_is_not_the_gzip_it_claims_is_a_400(ready_port):
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, answer = request(ready_port, "POST", "/query_dp_ranks", b"\x1f\x8b no", headers)
    assert status == 400 and "unreadable body" in answer["error"]["message"], answer
    assert post(ready_port, "/query_dp_ranks", {"bootstrap_rooms": [1, 2]}) == (200, {"1": 1})


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_a_body_coded_br_or_zstd_is_a_415_naming_the_accepted_codings(ready_port, coding):
    """As from every server and the router (docs/protocol.md section 2): the 415 carries
    `Accept-Encoding`, which the bootstrap server's left out."""
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    conn = http.client.HTTPConnection("127.0.0.1", ready_port, timeout=5)
    try:
        conn.request("POST", "/query_dp_ranks", body=b"{}", headers=headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 415, answer
    assert resp.headers["Accept-Encoding"] == "gzip, deflate, identity", resp.headers
    message = answer["error"]["message"]
    assert message.startswith(f"POST /query_dp_ranks: Content-Encoding {coding} is not"), message


def test_a_client_that_leaves_mid_body_is_one_log_line_not_a_traceback(tmp_path):
    """A decode server (or anyone) dropping its POST mid-body is a client event: it once
    logged 'unexpected error' with a traceback at ERROR (this site has no handler
    cancellation, so the read raised ConnectionResetError into the error middleware)."""
    port = free_port()
    log_path = tmp_path / "bootstrap.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.disagg.bootstrap_server", "--host", "127.0.0.1",
             "--port", str(port), "--dp-size", "1"],
            cwd=REPO_ROOT, env=python_path_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_healthy(port, proc)
        writes = [("POST", "/register_dp_rank"), ("POST", "/query_dp_ranks"), ("PUT", "/route")]
        for method, path in writes:
            for reset in (False, True):
                send_part_and_leave(f"http://127.0.0.1:{port}", method, path, reset)
        line = "the client left before its body was complete"
        wait_until(
            lambda: log_path.read_text().count(line) == 6, 30, "one log line per client that left"
        )
        text = log_path.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text
        assert request(port, "GET", "/health") == (200, {"status": "ok"})
    finally:
        stop_process(proc)
