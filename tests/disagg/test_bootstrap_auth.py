"""Bootstrap writes under a disagg secret, over real HTTP: without, with a wrong and with the
right proof, replays, and the read routes left open."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest

from pdserve.disagg.bootstrap_client import (
    BootstrapClientError,
    register_worker_blocking,
    write_headers,
)
from tests.disagg.bootstrap_fixtures import registration
from tests.disagg.test_bootstrap_server import (
    request,
    start_server_process,
    stop_process,
    wait_healthy,
)
from tests.helpers import free_port

SECRET = "correct horse"


@pytest.fixture
def port() -> Iterator[int]:
    """A bootstrap server process (dp_size 2) whose writes need SECRET."""
    port = free_port()
    proc = start_server_process(port, dp_size=2, env={"PDSERVE_DISAGG_SECRET": SECRET})
    try:
        wait_healthy(port, proc)
        yield port
    finally:
        stop_process(proc)


WRITES = [
    ("PUT", "/route", msgspec.json.encode(registration(0))),
    ("POST", "/register_dp_rank", json.dumps({"bootstrap_room": 7, "dp_rank": 1}).encode()),
    ("POST", "/register_dp_rank", json.dumps({"bootstrap_room": 8, "error": "x"}).encode()),
]


@pytest.mark.parametrize("method, path, body", WRITES)
def test_a_write_needs_a_fresh_proof_of_the_secret(port, method, path, body):
    status, answer = request(port, method, path, body)
    assert status == 401 and "missing X-PDServe-Proof" in answer["error"]["message"]

    wrong = write_headers("not the secret", method, path, body)
    status, answer = request(port, method, path, body, wrong)
    assert status == 401 and "secrets differ" in answer["error"]["message"]

    right = write_headers(SECRET, method, path, body)
    assert request(port, method, path, body, right)[0] == 200

    status, answer = request(port, method, path, body, right)
    assert status == 401 and "replayed" in answer["error"]["message"]


def test_a_proof_covers_the_body(port):
    method, path, body = WRITES[1]
    headers = write_headers(SECRET, method, path, body)
    other = json.dumps({"bootstrap_room": 7, "dp_rank": 0}).encode()
    status, answer = request(port, method, path, other, headers)
    assert status == 401 and "secrets differ" in answer["error"]["message"]


def test_reads_stay_open(port):
    register_worker_blocking(f"http://127.0.0.1:{port}", registration(0), 5.0, SECRET)
    register_worker_blocking(f"http://127.0.0.1:{port}", registration(1), 5.0, SECRET)
    assert request(port, "GET", "/health")[0] == 200
    assert request(port, "GET", "/route")[0] == 200
    assert request(port, "GET", "/route?prefill_dp_rank=1")[0] == 200
    body = json.dumps({"bootstrap_rooms": [1]}).encode()
    assert request(port, "POST", "/query_dp_ranks", body)[0] == 200


def test_a_worker_with_the_wrong_secret_fails_at_once_with_the_reason(port):
    with pytest.raises(BootstrapClientError, match="secrets differ") as info:
        register_worker_blocking(f"http://127.0.0.1:{port}", registration(0), 30.0, "wrong")
    assert info.value.status == 401
