"""`pdserve up --api-key K --disagg-secret S`: the router and both servers refuse requests
without the key on every route but /health, the router reaches its workers with its key,
prefill and decode prove the secret to each other, `pdserve bench --api-key` measures
through it, and neither credential appears on a command line."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import requests

from pdserve.bench import driver
from pdserve.bench.config import BenchConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import Router
from tests.helpers import free_port, http_status, wait_until
from tests.router.test_cluster import Up

pytestmark = pytest.mark.timeout(300)
KEY = "router-key-1"
SECRET = "pd-secret-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
AUTH_OTHER = {"Authorization": "Bearer another-key"}
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}


def router_routes() -> list[tuple[str, str]]:
    routes = Router(RouterConfig(api_key=KEY)).routes()
    return sorted((method, path) for path, methods in routes.items() for method in methods)


def _cmdlines(pids: list[int]) -> str:
    paths = [Path(f"/proc/{pid}/cmdline") for pid in pids]
    return "\n".join(p.read_bytes().replace(b"\0", b" ").decode() for p in paths)


def test_up_with_credentials_guards_every_process_and_bench_passes_the_key(tmp_path):
    port, prefill_port, decode_port = free_port(), free_port(), free_port()
    up = Up(
        "--model-path", "tiny-random", "--torch-threads", "1", "--port", str(port),
        "--prefill-port", str(prefill_port), "--decode-port", str(decode_port),
        "--api-key", KEY, "--disagg-secret", SECRET,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in up.output() or up.proc.poll() is not None,
            240,
            "pdserve up to be ready",
        )
        assert up.proc.poll() is None, up.output()
        assert "Authorization: Bearer <the --api-key>" in up.output()
        # The router: /health open, everything else needs the key.
        assert http_status(f"{url}/health") == 200
        for method, path in router_routes():
            if path == "/health":
                continue
            for headers in ({}, {"Authorization": "Bearer nope"}):
                resp = requests.request(method, url + path, headers=headers, timeout=10)
                assert resp.status_code == 401, (method, path, resp.text)
                error = resp.json()["error"]
                assert "Bearer" in error["message"]
                assert error["type"] == "authentication_error", error  # as the servers say
        # Through the router: its own key opens both workers, the secret the KV handshake.
        resp = requests.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        assert requests.get(f"{url}/workers", headers=AUTH, timeout=10).status_code == 200
        # The workers themselves refuse a client without the key.
        for worker_port in (prefill_port, decode_port):
            worker = f"http://127.0.0.1:{worker_port}"
            assert http_status(f"{worker}/health") == 200
            assert requests.get(f"{worker}/server_info", timeout=10).status_code == 401
        # `pdserve bench --api-key` measures through the router.
        cfg = BenchConfig(
            base_url=url, endpoint="chat", num_prompts=3, random_input_len=16,
            random_output_len=3, progress=False, request_timeout_s=60.0, api_key=KEY,
            output=str(tmp_path / "run.json"),
        )  # fmt: skip
        result = asyncio.run(driver.run_single(cfg))
        assert result["completed"] == 3 and result["failed"] == 0, result["errors"]
        # Credentials travel in the children's environment, never on a command line.
        cmdlines = _cmdlines(up.child_pids())
        assert cmdlines.count("pdserve") == 3, cmdlines
        assert KEY not in cmdlines and SECRET not in cmdlines, cmdlines
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
    finally:
        up.kill_everything()


def test_a_router_whose_key_its_worker_refuses_says_so_in_its_log_and_its_503s(server_factory):
    """The worker stays out of rotation; the reason was logged at debug level only, so
    clients got 503 'no healthy server' and the router's log said nothing; then the log
    said it, but the 503s still did not."""
    server = server_factory(["--model-path", "tiny-random", "--api-key", KEY])
    router_argv = ["--worker", server.url, "--api-key", "another-key"]
    router = server_factory([*router_argv, "--health-check-interval-s", "0.2"], subcommand="router")
    wait_until(
        lambda: "refused the router's API key (GET" in router.output(), 60, "the router's warning"
    )
    answer = requests.post(
        f"{router.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 1},
        headers=AUTH_OTHER,
        timeout=30,
    )
    assert answer.status_code == 503, answer.text
    assert router.output().count("refused the router's API key") == 1  # once, not per check
    # The client is told the cause too: the 503 said only "1 failing health checks".
    cause = f"{server.url} refused the router's API key (HTTP 401)"
    assert cause in answer.json()["error"]["message"], answer.text
    ready = requests.get(f"{router.url}/readiness", headers=AUTH_OTHER, timeout=10)
    assert ready.status_code == 503 and cause in ready.json()["error"]["message"], ready.text
