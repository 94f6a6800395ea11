"""Data parallelism: routed ranks, round robin, worker deaths and start failures, loud and fast."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from pdserve.bench import proc_tree
from pdserve.serving.ipc_dir import remove_stale
from tests.conftest import TINY_ARGS
from tests.helpers import (
    REPO_ROOT,
    free_port,
    http_json,
    open_sse,
    python_path_env,
    read_sse,
    wait_until,
)

SHORT = {"max_new_tokens": 4, "temperature": 0.0}
LONG = {"max_new_tokens": 3000, "ignore_eos": True}


def inflight_by_rank(url: str) -> list[int]:
    return [r["num_reqs"] for r in http_json("GET", f"{url}/get_load")[1]]


@pytest.fixture(scope="module")
def dp2_server():
    from tests.helpers import launch_server

    with launch_server([*TINY_ARGS, "--dp-size", "2"]) as server:
        yield server


def test_routed_dp_rank_and_its_alias_pick_the_worker(dp2_server):
    url = dp2_server.url
    for field, rank in [("routed_dp_rank", 1), ("data_parallel_rank", 0), ("routed_dp_rank", 0)]:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                http_json,
                "POST",
                f"{url}/generate",
                {"text": "x", "rid": f"r-{field}-{rank}", field: rank, "sampling_params": LONG},
            )
            wait_until(lambda: sum(inflight_by_rank(url)) == 1, 30, "the request to run")
            loads = inflight_by_rank(url)
            http_json("POST", f"{url}/abort_request", {"rid": f"r-{field}-{rank}"})
            assert future.result(60)[0] == 200
        assert loads[rank] == 1 and loads[1 - rank] == 0, (field, rank, loads)
        wait_until(lambda: sum(inflight_by_rank(url)) == 0, 30, "the rank to drain")


def test_routed_rank_out_of_range_is_400(dp2_server):
    status, out = http_json(
        "POST", f"{dp2_server.url}/generate", {"text": "x", "routed_dp_rank": 2}
    )
    assert status == 400 and "out of range" in out["error"]["message"]
    status, out = http_json(
        "POST",
        f"{dp2_server.url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "data_parallel_rank": 5},
    )
    assert status == 400 and "data_parallel_rank" in out["error"]["message"]


def test_round_robin_spreads_requests_over_both_ranks(dp2_server):
    url = dp2_server.url
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(
                http_json,
                "POST",
                f"{url}/generate",
                {"text": f"rr{i}", "rid": f"rr-{i}", "sampling_params": LONG},
            )
            for i in range(4)
        ]
        wait_until(lambda: sum(inflight_by_rank(url)) == 4, 30, "four requests to run")
        loads = inflight_by_rank(url)
        http_json("POST", f"{url}/abort_request", {"abort_all": True})
        assert all(f.result(60)[0] == 200 for f in futures)
    assert loads == [2, 2]
    status, info = http_json("GET", f"{url}/server_info")
    assert info["dp_size"] == 2 and info["load_balance_method"] == "round_robin"


def test_unseeded_requests_sample_differently_on_each_rank(dp2_server):
    """Each rank draws its own seeds for requests that give none: ranks drawing alike
    answered the k-th such request of each with the same tokens."""
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 8, "temperature": 3}}
    answers: dict[int, list[tuple[int, ...]]] = {0: [], 1: []}
    for _ in range(8):
        for rank in answers:
            status, out = http_json(
                "POST", f"{dp2_server.url}/generate", {**body, "routed_dp_rank": rank}
            )
            assert status == 200, out
            answers[rank].append(tuple(out["output_ids"]))
    assert not set(answers[0]) & set(answers[1]), answers


def test_a_dead_worker_fails_its_requests_with_5xx_and_reports_no_load(server_factory):
    server = server_factory([*TINY_ARGS, "--dp-size", "2"])
    url = server.url
    pids = http_json("GET", f"{url}/server_info")[1]["worker_pids"]
    doomed = {"text": "doomed", "routed_dp_rank": 1, "sampling_params": LONG}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(http_json, "POST", f"{url}/generate", doomed)
        # Started (200, its first output sent) before the kill: a stream killed before then
        # gets the HTTP status instead, as the plain request does.
        stream = open_sse(f"{url}/generate", {**doomed, "stream": True}, 30)
        wait_until(lambda: inflight_by_rank(url)[1] == 2, 30, "both requests to run on rank 1")
        os.kill(pids[1], signal.SIGKILL)
        status, out = future.result(30)
        events = read_sse(stream)
    assert status == 500 and "worker 1" in out["error"]["message"]
    # The stream had started: the failure arrives as an error event, then [DONE].
    assert events[-1] == "[DONE]" and "worker 1" in events[-2]["error"]["message"]
    status, out = http_json("POST", f"{url}/generate", {"text": "x", "routed_dp_rank": 1})
    assert status == 503 and "worker 1" in out["error"]["message"]
    assert http_json("GET", f"{url}/health")[0] == 503
    # Its last report (both requests running, their pages) does not stand for good.
    dead = http_json("GET", f"{url}/get_load")[1][1]
    assert not dead["alive"] and dead["num_reqs"] == dead["num_used_pages"] == 0, dead
    metrics = http_json("GET", f"{url}/metrics")[1]
    assert 'pdserve_num_running_reqs{dp_rank="1",model_name="tiny-random"} 0.0' in metrics
    assert 'pdserve_kv_pages_used{dp_rank="1",model_name="tiny-random"} 0.0' in metrics
    # Rank 0 still serves, and round robin skips the dead rank.
    for _ in range(2):
        assert (
            http_json("POST", f"{url}/generate", {"text": "x", "sampling_params": SHORT})[0] == 200
        )


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_exit_when_the_front_end_is_killed(server_factory, method):
    """Either way workers start, none outlives a front end killed with SIGKILL: a fork
    server's workers hold no part in keeping it alive (multiprocessing hands each the pipe
    end whose closing ends the fork server)."""
    env = {} if method == "forkserver" else {"PDSERVE_WORKER_MULTIPROC_METHOD": "spawn"}
    server = server_factory([*TINY_ARGS, "--dp-size", "2"], env=env)
    pids = http_json("GET", f"{server.url}/server_info")[1]["worker_pids"]
    assert proc_tree.worker_pids(server.pid) == sorted(pids)  # what the chaos soak kills
    parents = {_parent(pid) for pid in pids}
    if method == "spawn":
        assert parents == {server.pid}
    else:  # forks of one fork server, the front end's child
        (fork_server,) = parents
        assert fork_server != server.pid and _parent(fork_server) == server.pid
        pids.append(fork_server)
        (listener,) = [c.laddr for c in psutil.Process(fork_server).net_connections("unix")]
    os.kill(server.pid, signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie waits for the reaper only; /proc tells whether it still runs.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"

    wait_until(lambda: all(gone(p) for p in pids), 10, "the orphaned workers to exit")
    if method == "forkserver":
        # The fork server's socket was left in a `pymp-*` directory nothing removed; in a
        # socket directory of the server's own, the next server removes it.
        remove_stale(tempfile.gettempdir())
        assert not os.path.exists(os.path.dirname(listener)), listener


def run_serve(
    args: list[str], timeout_s: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**python_path_env(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pdserve", "serve", "--port", str(free_port()), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_worker_that_cannot_start_fails_the_server_loudly():
    done = run_serve([*TINY_ARGS, "--device", "cuda:7"])
    assert done.returncode != 0
    assert "worker 0 failed to start" in done.stderr


def test_bad_options_fail_with_a_clear_message():
    done = run_serve(["--model-path", "/no/such/model"])
    assert done.returncode != 0 and "unknown model" in done.stderr
    done = run_serve([*TINY_ARGS, "--dp-size", "0"])
    assert done.returncode != 0 and "--dp-size must be >= 1" in done.stderr
    done = run_serve(TINY_ARGS, env={"PDSERVE_WORKER_MULTIPROC_METHOD": "fork"})
    assert done.returncode != 0
    assert "PDSERVE_WORKER_MULTIPROC_METHOD='fork': expected one of forkserver, spawn" in (
        done.stderr
    )


def test_a_worker_start_deadline_missed_names_the_flag_and_its_value():
    """A 0.5 s deadline failed as "... within 0 s": rounded to whole seconds, flag unnamed."""
    done = run_serve([*TINY_ARGS, "--dp-size", "2", "--worker-start-timeout-s", "0.5"])
    assert done.returncode == 1, done.stderr
    assert "within 0.5 s (--worker-start-timeout-s" in done.stderr, done.stderr


def test_a_taken_kv_events_port_fails_the_start_with_the_flag_named_not_a_traceback():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_serve([*TINY_ARGS, "--kv-events-replay-port", str(port)])
    assert done.returncode == 1, done.stderr
    assert f"server failed to start: --kv-events-replay-port {port}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--port", "--bootstrap-port"])
def test_a_taken_port_or_bootstrap_port_fails_the_start_with_the_flag_named(flag):
    """Either failed the start as "error while attempting to bind on address ...", which
    said neither which of the server's ports it was nor that it was a flag's."""
    mode = ["--mode", "prefill"] if flag == "--bootstrap-port" else []
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_serve([*TINY_ARGS, *mode, "--host", "127.0.0.1", flag, str(port)])
    assert done.returncode == 1, done.stderr
    assert f"server failed to start: {flag} {port}: cannot listen on" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_request_that_cannot_be_encoded_is_not_left_in_flight():
    # A 65-bit seed cannot be sent (msgpack); the parser refuses it, and if anything else
    # ever slips through, submit must not leave a rid no worker will ever finish.
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.request import SamplingParams
    from pdserve.serving.config import ServerArgs, ServerConfig
    from pdserve.serving.dp_controller import DPController
    from pdserve.serving.hooks import colocated_worker_hooks
    from pdserve.serving.metrics import ServerMetrics
    from pdserve.serving.protocol import GenerateReq

    cfg = ServerConfig(ServerArgs(), EngineConfig())
    controller = DPController(
        cfg, ServerMetrics("colocated", cfg.served_model_name), colocated_worker_hooks
    )
    try:
        req = GenerateReq(rid="r", input_ids=[1], sampling=SamplingParams(seed=2**70))
        with pytest.raises(OverflowError):
            controller.submit(req, 0)
        assert controller.inflight == {}
        assert controller.inflight_counts() == ([0], [0])
    finally:
        controller.ctx.destroy(linger=0)


def test_server_info_reports_one_workers_pool_and_get_load_each_ranks(dp2_server):
    """As SGLang: max_total_num_tokens and max_running_requests are one worker's."""
    info = http_json("GET", f"{dp2_server.url}/server_info")[1]
    ranks = http_json("GET", f"{dp2_server.url}/get_load")[1]
    assert len(ranks) == 2
    pool_tokens = {r["num_total_pages"] * info["page_size"] for r in ranks}
    assert pool_tokens == {info["max_total_num_tokens"]}, (info, ranks)


KV_EVENT_ENDPOINTS = ("kv_events_endpoint", "kv_events_replay_endpoint")


def test_the_workers_links_are_private_and_a_foreign_frame_is_dropped(dp2_server):
    """The front end's links to its workers are Unix sockets in a directory only its user
    can enter, not loopback ports, which any local process reaches and a stale ZMQ peer of
    an earlier server reconnects to when this one reuses the port (seen: a start failed
    "Expected `object`, got `int`"). A frame that still comes (this user's) is dropped: one
    ended the loop reading the port, and every request hung (outputs), or every worker was
    later taken for unresponsive (beats). The module's server: the frames leave it serving."""
    import psutil
    import zmq

    server = dp2_server
    assert "from no worker" not in server.output()
    http_port = int(server.url.rsplit(":", 1)[1])
    front_end = psutil.Process(server.pid)
    info = http_json("GET", f"{server.url}/server_info")[1]
    public = {http_port, *(int(info[k].rsplit(":", 1)[1]) for k in KV_EVENT_ENDPOINTS)}
    ports = {c.laddr.port for c in front_end.net_connections("tcp") if c.status == "LISTEN"}
    assert ports == public, (ports, public)  # HTTP and the KV event streams only
    links = {c.laddr for c in front_end.net_connections("unix") if "/pdserve-" in c.laddr}
    assert {os.path.basename(p) for p in links} == {"out", "beats", "ctrl0", "ctrl1"}, links
    assert os.stat(os.path.dirname(next(iter(links)))).st_mode & 0o077 == 0
    ctx = zmq.Context()
    try:
        for path in links:  # the PULLs take it; the PUSHes read nothing
            sock = ctx.socket(zmq.PUSH)
            sock.connect(f"ipc://{path}")
            sock.send(b"\x01", zmq.NOBLOCK)  # msgpack 1
            sock.close(linger=2000)
    finally:
        ctx.term()
    body = {"input_ids": [5, 6, 7], "sampling_params": SHORT}
    for _ in range(4):  # both ranks
        status, answer = http_json("POST", f"{server.url}/generate", body, timeout_s=30)
        assert status == 200 and len(answer["output_ids"]) == 4, answer
    # both PULL sockets (outputs, beats) took a frame and their loops went on
    wait_until(lambda: server.output().count("from no worker") == 2, 30, "two dropped frames")


def test_a_worker_message_naming_no_rank_of_the_server_is_dropped(dp2_server):
    """A well-formed WorkerLoad naming dp_rank 7 on the outputs link (a stale worker of
    another server, or any process of this user): its IndexError ended the loop delivering
    every worker's outputs, so every request hung until its deadline, silently."""
    import psutil
    import zmq

    from pdserve.serving.protocol import WorkerLoad, encode

    server = dp2_server
    links = psutil.Process(server.pid).net_connections("unix")
    (out,) = {c.laddr for c in links if os.path.basename(c.laddr) == "out"}
    load = WorkerLoad(
        dp_rank=7, num_running=0, num_waiting=0, num_tokens=0, num_used_pages=0,
        num_free_pages=0, num_total_pages=0,
    )  # fmt: skip
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"ipc://{out}")
        sock.send(encode(load), zmq.NOBLOCK)
        sock.close(linger=2000)
    finally:
        ctx.term()
    wait_until(lambda: "dp_rank 7" in server.output(), 30, "the message dropped")
    body = {"input_ids": [5, 6, 7], "sampling_params": SHORT}
    status, answer = http_json("POST", f"{server.url}/generate", body, timeout_s=30)
    assert status == 200 and len(answer["output_ids"]) == 4, answer
