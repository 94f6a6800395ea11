"""`pdserve up`: starts router + prefill + decode on port 30000 or, when it is taken, a free
port it announces; serves a chat request (a 404 for another model), and leaves no process
behind after SIGTERM; a child that dies early stops the rest with its error."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from pdserve.cluster import (
    DEFAULT_ROUTER_PORT,
    ClusterConfig,
    choose_router_port,
    plan,
    server_argv,
    shared_gpu_note,
    stop_timeout,
)
from pdserve.config import from_args
from pdserve.procs import port_is_free
from tests.helpers import (
    PYTHON,
    REPO_ROOT,
    http_status,
    ipv6_loopback_missing,
    open_sse,
    python_path_env,
    read_sse,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as "pid state cmdline"."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid_comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        fields = rest.split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {fields[0]} {pid_comm}")
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


class Up:
    def __init__(self, *args: str):
        self.log = tempfile.NamedTemporaryFile(prefix="pdserve-up-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "pdserve", "up", *args],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=python_path_env(),
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def child_pids(self) -> list[int]:
        return sorted({int(p) for p in re.findall(r"\(pid (\d+)\)", self.output())})

    def kill_everything(self) -> None:
        for pgid in [self.proc.pid, *self.child_pids()]:
            if group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)
        os.unlink(self.log.name)


def answers(url: str) -> bool:
    try:
        requests.get(f"{url}/health", timeout=5)
    except requests.ConnectionError:
        return False
    return True


def hold_port(port: int) -> socket.socket | None:
    """A listening socket on `port`, or None when another process holds it already."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_router_port_is_the_default_when_free_else_a_free_one_announced():
    assert choose_router_port(None, lambda port: True, lambda: 5) == (DEFAULT_ROUTER_PORT, None)
    assert choose_router_port(4242, lambda port: False, lambda: 5) == (4242, None)
    port, note = choose_router_port(None, lambda port: port != DEFAULT_ROUTER_PORT, lambda: 5)
    assert port == 5
    assert note == (
        "port 30000 is taken; the router listens on port 5 instead "
        "(point clients and `pdserve bench --base-url` at it, or pass --port)"
    )


def test_a_listening_port_is_not_free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port)


def test_up_falls_back_from_a_taken_30000_serves_chat_and_leaves_nothing_after_sigterm():
    """Also: a second SIGTERM (Ctrl-C) goes on to the children, which end their drains at
    once; `up` took it alone, and every drain ran its full --shutdown-timeout-s (here 600 s:
    `up` waited out --stop-timeout-s, then SIGKILLed them, the stream cut unanswered)."""
    holder = hold_port(DEFAULT_ROUTER_PORT)  # None: someone else holds it, taken all the same
    drain = "--shutdown-timeout-s 600"
    up = Up(
        *("--model-path", "tiny-random", "--served-model-name", "my-llm", "--torch-threads", "1"),
        *("--server-args", drain, "--router-args", drain, "--stop-timeout-s", "120"),
    )
    try:
        wait_until(lambda: "the router listens on port" in up.output(), 60, "the port notice")
        match = re.search(
            r"port 30000 is taken; the router listens on port (\d+) instead", up.output()
        )
        assert match, up.output()
        url = f"http://127.0.0.1:{match.group(1)}"
        wait_until(
            lambda: http_status(f"{url}/readiness") == 200 or up.proc.poll() is not None,
            240,
            "pdserve up to be ready",
        )
        wait_until(lambda: "Ctrl-C stops everything" in up.output(), 10, "the banner")
        assert f"curl {url}/v1/chat/completions" in up.output()
        chat = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        resp = requests.post(f"{url}/v1/chat/completions", timeout=60, json=chat)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        assert resp.json()["model"] == "my-llm"
        assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "my-llm"
        # A worker's 404 reaches the client through the router as a 404.
        resp = requests.post(
            f"{url}/v1/chat/completions", timeout=60, json={**chat, "model": "gpt-4o"}
        )
        assert resp.status_code == 404, resp.text
        assert "The model `gpt-4o` does not exist." in resp.json()["error"]["message"]
        children = up.child_pids()
        assert len(children) == 3
        long = {
            "text": "x",
            "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
        }
        stream = open_sse(f"{url}/generate", long)
        assert stream.readline().startswith(b"data: ")  # running
        up.proc.send_signal(signal.SIGTERM)
        decode = re.search(r"decode +(http://\S+)", up.output())
        assert decode, up.output()
        wait_until(lambda: not answers(url), 30, "the router's drain (its port closed)")
        draining = lambda: http_status(f"{decode.group(1)}/health") == 503  # noqa: E731
        wait_until(draining, 30, "the drain of decode, which runs the stream")
        up.proc.send_signal(signal.SIGTERM)
        events = read_sse(stream)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-2:]
        assert up.proc.wait(60) == 0
        assert [group_members(pid) for pid in children] == [[], [], []]
    finally:
        up.kill_everything()
        if holder is not None:
            holder.close()


def test_up_stops_everything_when_a_child_dies_early():
    up = Up("--model-path", "tiny-random", "--server-args", "--dp-size 0")
    try:
        assert up.proc.wait(120) == 1
        out = up.output()
        assert re.search(r"pdserve up: (prefill|decode) exited with code \d+", out), out
        assert "--dp-size must be >= 1" in out
        children = up.child_pids()
        assert len(children) == 3 and [group_members(pid) for pid in children] == [[], [], []]
    finally:
        up.kill_everything()


# A child of `pdserve up` as the thread reading its output sees it (`Child.echo_output`), in a
# process whose own stdout is a pipe nobody reads any more (`| head` exited, the terminal went).
ECHO_SCRIPT = """
import sys, threading
from pdserve.cluster import Child
chatty = [sys.executable, "-c", "for _ in range(20000): print('x' * 50, flush=True)"]
child = Child("chatty", chatty, "http://127.0.0.1:1", [])
child.start()
threading.Thread(target=child.echo_output, daemon=True).start()
child.proc.wait(30)  # TimeoutExpired: the child blocked on a full pipe
"""


def start_with_stdout_gone(script: str) -> subprocess.Popen:
    """`script` in a Python whose stdout is a pipe nobody reads any more."""
    proc = subprocess.Popen(
        [PYTHON, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_path_env(),
    )
    proc.stdout.close()  # its reader leaves at once
    return proc


def test_a_childs_output_is_still_read_once_ups_stdout_is_gone():
    """The echo of a child's line raised BrokenPipeError (EIO from a closed terminal) and
    ended the thread reading that child's output: past the pipe's 64 KiB the child blocked
    on its next log line, and a server froze with every request it held."""
    proc = start_with_stdout_gone(ECHO_SCRIPT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


# `stop_all` in a process whose stdout is a pipe nobody reads, over a child that ignores
# SIGTERM: its note "ignored SIGTERM; killing it" must not end it before the SIGKILL.
STOP_SCRIPT = """
import sys
from pdserve.cluster import Child, stop_all
stubborn = [sys.executable, "-c", "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); signal.pause()"]
child = Child("stubborn", stubborn, "http://127.0.0.1:1", [], echo=False)
child.start()
print(child.proc.pid, file=sys.stderr, flush=True)
assert child.proc.stdout.readline().strip() == b"ready"  # SIGTERM is ignored from here on
stop_all([child], 0.2)
"""


def test_up_kills_a_child_that_ignores_sigterm_once_its_stdout_is_gone():
    proc = start_with_stdout_gone(STOP_SCRIPT)
    child_pid = None
    try:
        child_pid = int(proc.stderr.readline())
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert not pid_alive(child_pid)
    finally:
        if child_pid is not None and pid_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Running (a zombie of an exited parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_notes_a_gpu_shared_without_mps(tmp_path):
    """Both servers on one CUDA device and no MPS daemon's control pipe: a note says why
    decode's latency suffers and how to start the daemon; none on the CPU or with MPS."""
    no_mps = str(tmp_path / "absent")
    note = shared_gpu_note("--device cuda:1 --dtype bfloat16", no_mps)
    assert note is not None and "cuda:1" in note and "nvidia-cuda-mps-control -d" in note
    assert shared_gpu_note("--dtype bfloat16 --device=cuda", no_mps) is not None
    assert shared_gpu_note("", no_mps) is None
    assert shared_gpu_note("--device cpu", no_mps) is None
    (tmp_path / "control").touch()  # the daemon's control pipe
    assert shared_gpu_note("--device cuda", str(tmp_path)) is None


def test_up_waits_out_the_longest_drain_it_gave_a_child_before_sigkill():
    """A child told to drain for 60 s is not SIGKILLed at 15 s: up's grace follows the
    longest --shutdown-timeout-s among the children (the last one given wins, as in the
    child), unless --stop-timeout-s says otherwise."""
    margin = stop_timeout(ClusterConfig()) - 10.0  # both children drain 10 s by default
    assert margin > 0
    slow_server = ClusterConfig(server_args="--shutdown-timeout-s 5 --shutdown-timeout-s=60")
    assert stop_timeout(slow_server) == 60.0 + margin
    assert stop_timeout(ClusterConfig(router_args="--shutdown-timeout-s 30")) == 30.0 + margin
    assert stop_timeout(ClusterConfig(server_args="--shutdown-timeout-s 1")) == 10.0 + margin
    assert stop_timeout(ClusterConfig(server_args="--shutdown-timeout-s soon")) == 10.0 + margin
    assert stop_timeout(ClusterConfig(server_args="--shutdown-timeout-s 60", stop_timeout_s=3)) == 3


@pytest.mark.parametrize(
    ("field", "args", "flag"),
    [
        ("server_args", "--mode decode", "--mode"),
        ("server_args", "--page-size 32 --disaggregation-mode=decode", "--disaggregation-mode"),
        ("server_args", "--port 31099", "--port"),
        ("server_args", "--host 0.0.0.0", "--host"),
        ("server_args", "--bootstrap-port 31098", "--bootstrap-port"),
        ("server_args", "--disaggregation-bootstrap-port=31098", "--disaggregation-bootstrap-port"),
        ("router_args", "--port=5", "--port"),
        ("server_args", "--api-key k", "--api-key"),
        ("router_args", "--api-key=k", "--api-key"),
    ],
)
def test_up_refuses_extra_args_that_set_a_flag_it_sets_itself(field, args, flag):
    """They would come last and win: two decode servers and no prefill, both servers on
    one port, or a router `up` waits for at another address until its ready deadline."""
    option = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{option} cannot set {flag}"):
        ClusterConfig(**{field: args})
    ClusterConfig(server_args="--page-size 32 --dp-size 2", router_args="--policy kv_aware")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"prefill_port": 31071, "decode_port": 31071}, "--prefill-port and --decode-port are"),
        ({"port": 31071, "bootstrap_port": 31071}, "--port and --bootstrap-port are both 31071"),
        ({"decode_port": 70000}, "--decode-port out of range: 70000"),
        ({"host": ""}, "--host must not be empty"),
    ],
)
def test_up_refuses_ports_it_cannot_bind_before_starting_a_child(fields, error):
    """Each failed only once the servers had loaded their model: a bind error naming one of
    the ports, the router's "duplicate worker URL", or getaddrinfo's traceback (host "")."""
    with pytest.raises(ValueError, match=error):
        ClusterConfig(**fields)
    ClusterConfig(port=0, prefill_port=31071, decode_port=31072)  # 0: a free port


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"api_key": ""}, "--api-key .* must be non-empty"),
        ({"api_key": "a b"}, "--api-key .* must be non-empty visible ASCII without spaces"),
        ({"disagg_secret": ""}, "--disagg-secret must not be empty"),
    ],
)
def test_up_refuses_an_empty_key_or_secret_rather_than_running_open(fields, error):
    """An empty --api-key or --disagg-secret was passed to no child: the cluster ran with
    neither, silently (`--api-key "$KEY"` with $KEY unset)."""
    with pytest.raises(ValueError, match=error):
        ClusterConfig(**fields)


@pytest.mark.parametrize("option", ["--server-args", "--router-args"])
def test_up_takes_one_lone_flag_as_extra_args(option):
    """argparse read `--server-args --disable-radix-cache` as two options and failed with
    "argument --server-args: expected one argument"; a value with a space passed."""
    from pdserve.cli import build_parser

    for value in ("--dp-aware", "--page-size 32", "--x=1"):
        ns = build_parser().parse_args(["up", option, value, "--port", "31090"])
        assert vars(ns)[option[2:].replace("-", "_")] == value and ns.port == 31090


@pytest.mark.parametrize(
    "argv, steers",
    [
        (["--policy", "kv_aware", "--prefill-dp", "2"], True),
        (["--policy", "cache_aware", "--decode-dp", "3"], True),
        (["--policy", "kv_aware"], False),  # one rank each: nothing to steer
        (["--policy", "round_robin", "--prefill-dp", "2"], False),
        (["--policy", "kv_aware", "--prefill-dp", "2", "--no-dp-aware"], False),
        (["--dp-aware"], True),
    ],
)
def test_up_has_the_router_pick_ranks_where_a_cache_policy_meets_several(argv, steers):
    """`pdserve up --policy kv_aware --prefill-dp 2` routed on the caches to the one server,
    whose own rank pick (room mod 2) then ignored them: the prefix was hit only by chance.
    The router now picks the ranks there unless told `--no-dp-aware`."""
    from pdserve.cli import build_parser

    ns = build_parser().parse_args(["up", *argv])
    config = from_args(ClusterConfig, ns)
    router = plan(config)[2]
    assert ("--dp-aware" in router.argv) is steers


def test_up_passes_every_served_name_to_both_servers():
    from pdserve.cli import build_parser
    from pdserve.disagg.config import pd_server_config_from_args

    argv = server_argv(ClusterConfig(served_model_name=["a", "b"]), "decode", 31001, 2)
    ns = build_parser().parse_args(argv[argv.index("serve") :])
    assert pd_server_config_from_args(ns).model_names[:2] == ["a", "b"]


@pytest.mark.skipif(ipv6_loopback_missing() is not None, reason=str(ipv6_loopback_missing()))
def test_up_on_an_ipv6_host_draws_its_ports_there_and_names_children_by_bracketed_urls():
    """`pdserve up --host ::1` failed drawing ports (an IPv4 socket cannot bind ::1)."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        assert not port_is_free("::1", sock.getsockname()[1])
    prefill, decode, router = plan(ClusterConfig(host="::1"))
    for child in (prefill, decode, router):
        assert re.fullmatch(r"http://\[::1\]:\d+", child.url), child.url
    assert router.argv[router.argv.index("--prefill") + 1] == prefill.url
    assert router.argv[router.argv.index("--decode") + 1] == decode.url
