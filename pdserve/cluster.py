"""`pdserve up`: a local PD cluster on one host (router + one prefill + one decode server).

Runs in the `pdserve up` process, which only supervises: each role is a child process in
its own process group; all of them are stopped on Ctrl-C, SIGTERM, or when any one dies
(each drains its requests first; a second Ctrl-C or SIGTERM goes on to them, ending that).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pdserve import envs, netaddr
from pdserve.auth import API_KEY_FORM, api_key_ok, bearer_header
from pdserve.config import add_arguments, check, check_ports, from_args, opt
from pdserve.disagg.config import EMPTY_SECRET
from pdserve.procs import (
    NotReady,
    ProcessExited,
    die_with_parent,
    free_port,
    http_status,
    port_is_free,
    signal_group,
)
from pdserve.procs import wait_ready as procs_wait_ready
from pdserve.router.config import CACHE_POLICIES, POLICIES, RouterConfig
from pdserve.serving.config import ServerArgs

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_INTERVAL_S = 0.2
# Past a child's drain: aiohttp's grace for handlers, decode's failure reports (2 s), exits.
STOP_MARGIN_S = 8.0
DEFAULT_ROUTER_PORT = 30000  # SGLang's; the README and `pdserve bench` assume it


@dataclass(frozen=True)
class ClusterConfig:
    host: str = opt("127.0.0.1", "address every process binds")
    port: int | None = opt(
        None,
        f"router port (default: {DEFAULT_ROUTER_PORT}, or a free port, announced, "
        f"when {DEFAULT_ROUTER_PORT} is taken)",
    )
    prefill_port: int | None = opt(None, "prefill server port (default: a free port)")
    decode_port: int | None = opt(None, "decode server port (default: a free port)")
    bootstrap_port: int | None = opt(None, "prefill bootstrap port (default: a free port)")
    prefill_dp: int = opt(1, "DP workers of the prefill server")
    decode_dp: int = opt(1, "DP workers of the decode server")
    model_path: str | None = opt(
        None, "model for both servers (default: the servers' default)", flag="--model-path"
    )
    served_model_name: list[str] = opt(
        [],
        "model names of both servers' OpenAI routes (default: the --model-path value)",
        flag="--served-model-name",
    )
    page_size: int | None = opt(
        None, "KV page size for both servers (default: the servers' default)", flag="--page-size"
    )
    torch_threads: int | None = opt(
        None, "torch threads per worker process (default: the servers' default)"
    )
    server_args: str = opt(
        "",
        "more flags for both servers, one string, e.g. '--max-running-requests 32'",
        flag_string=True,
    )
    policy: str = opt("round_robin", "router policy", choices=POLICIES)
    dp_aware: bool | None = opt(
        None,
        "router picks DP ranks (see pdserve router --dp-aware); default: on where --policy "
        "routes on caches (kv_aware, cache_aware) and a server runs several DP workers, so the "
        "choice reaches the rank holding the prefix, not only its server; off otherwise",
    )
    api_key: str | None = opt(
        envs.api_key(),
        "API key of the router and both servers (the router sends it to them); handed to "
        "them in their environment, not on their command line (default: env PDSERVE_API_KEY)",
        repr=False,
    )
    disagg_secret: str | None = opt(
        envs.disagg_secret(),
        "secret shared by prefill and decode (bootstrap writes, KV handshake); handed to them "
        "in their environment (default: env PDSERVE_DISAGG_SECRET)",
        repr=False,
    )
    router_args: str = opt(
        "",
        "more flags for the router, one string, e.g. '--local-prefill-threshold 64'",
        flag_string=True,
    )
    ready_timeout_s: float = opt(600.0, "deadline for every process to become ready")
    stop_timeout_s: float | None = opt(
        None,
        "grace period after SIGTERM before SIGKILL (default: the longest --shutdown-timeout-s "
        f"of the children, from --server-args and --router-args, plus {STOP_MARGIN_S:g} s)",
    )

    def __post_init__(self) -> None:
        check(self.prefill_dp >= 1 and self.decode_dp >= 1, "--prefill-dp/--decode-dp must be >= 1")
        stop_ok = self.stop_timeout_s is None or self.stop_timeout_s > 0
        check(self.ready_timeout_s > 0 and stop_ok, "timeouts must be > 0")
        check(bool(self.host), "--host must not be empty (0.0.0.0: every interface)")
        # An empty key or secret passed nothing on: the cluster ran open, silently.
        check(api_key_ok(self.api_key), API_KEY_FORM)
        check(self.disagg_secret != "", EMPTY_SECRET)
        check_ports(
            {
                "--port": self.port,
                "--prefill-port": self.prefill_port,
                "--decode-port": self.decode_port,
                "--bootstrap-port": self.bootstrap_port,
            }
        )
        for option, args, owned in (
            ("--server-args", self.server_args, SERVER_FLAGS_OF_UP),
            ("--router-args", self.router_args, ROUTER_FLAGS_OF_UP),
        ):
            flag = owned_flag(args, owned)
            check(flag is None, f"{option} cannot set {flag}: `pdserve up` {owned.get(flag)}")


# Flags `pdserve up` gives its children itself, and what to use instead. Set again in
# --server-args or --router-args they would win (they come last): two decode servers and
# no prefill, servers on one port, or a router `up` waits for on another address until
# --ready-timeout-s.
SERVER_FLAGS_OF_UP = {
    "--mode": "starts one prefill and one decode server",
    "--disaggregation-mode": "starts one prefill and one decode server",
    "--host": "binds every process to its --host",
    "--port": "sets the servers' ports: use --prefill-port and --decode-port",
    # Prefill would bind it while the router sends decode, and up waits on, up's own.
    "--bootstrap-port": "tells the router the prefill's bootstrap port: use --bootstrap-port",
    "--disaggregation-bootstrap-port": "tells the router the prefill's bootstrap port: use "
    "--bootstrap-port",
    # The router would not send it: up waited out --ready-timeout-s for its readiness.
    "--api-key": "gives the router the key too, which it must send the servers: use --api-key",
}
ROUTER_FLAGS_OF_UP = {
    "--host": "binds every process to its --host",
    "--port": "sets the router's port: use --port",
    # up would not send it when it asks the router's /readiness: it waited out its deadline.
    "--api-key": "gives every process the key and asks the router with it: use --api-key",
}


def owned_flag(args: str, owned: dict[str, str]) -> str | None:
    """The first flag of `owned` that `args` sets (`--flag value` or `--flag=value`)."""
    for token in shlex.split(args):
        name = token.split("=", 1)[0]
        if name in owned:
            return name
    return None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start router + prefill + decode on this host; Ctrl-C stops all",
        description=__doc__.splitlines()[0],
    )
    add_arguments(parser, ClusterConfig)
    parser.set_defaults(func=run)


def choose_router_port(
    requested: int | None, is_free: Callable[[int], bool], pick_free: Callable[[], int]
) -> tuple[int, str | None]:
    """(router port, a note for the user or None). A port given on the command line is
    used as is; otherwise the default, or a free port when the default is taken."""
    if requested is not None:
        return requested, None
    if is_free(DEFAULT_ROUTER_PORT):
        return DEFAULT_ROUTER_PORT, None
    port = pick_free()
    return port, (
        f"port {DEFAULT_ROUTER_PORT} is taken; the router listens on port {port} instead "
        f"(point clients and `pdserve bench --base-url` at it, or pass --port)"
    )


def _term_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `pdserve up` dies, even by SIGKILL."""
    die_with_parent(signal.SIGTERM)


class Child:
    """One supervised process; its output is echoed with a prefix and its tail is kept."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        ready_paths: list[str],
        echo: bool = True,
        env: dict[str, str] | None = None,
    ):
        """`ready_paths`: paths under `url` (or whole URLs) that must answer 200; `env`:
        variables added to the child's environment (credentials stay off its argv)."""
        self.name = name
        self.argv = argv
        self.extra_env = env or {}
        self.url = url
        self.ready_urls = [p if "://" in p else url + p for p in ready_paths]
        self.echo = echo
        self.tail: deque[str] = deque(maxlen=40)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            **self.extra_env,
        }
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_term_with_parent if sys.platform == "linux" else None,
        )

    def echo_output(self) -> None:
        """Read the child's output to its end, echoing it while our stdout takes it: a child
        whose pipe is not read blocks on its next write once the pipe is full."""
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self.echo:
                try:
                    print(f"[{self.name}] {line}", flush=True)
                except OSError:  # our stdout is gone (its pipe's reader left, the tty closed)
                    self.echo = False

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def ready_headers(self) -> dict[str, str]:
        return bearer_header(self.extra_env.get("PDSERVE_API_KEY"))

    def ready(self) -> bool:
        return all(http_status(url, 2.0, self.ready_headers) == 200 for url in self.ready_urls)

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            signal_group(self.proc.pid, sig)


class ChildDied(Exception):
    def __init__(self, child: Child):
        code = child.exit_code()
        tail = "\n".join(f"  {line}" for line in child.tail)
        super().__init__(f"{child.name} exited with code {code}; its last output:\n{tail}")


def server_argv(c: ClusterConfig, mode: str, port: int, dp_size: int) -> list[str]:
    argv = [sys.executable, "-m", "pdserve", "serve", "--mode", mode, "--host", c.host]
    argv += ["--port", str(port), "--dp-size", str(dp_size)]
    for flag, value in (
        ("--model-path", c.model_path),
        ("--page-size", c.page_size),
        ("--torch-threads", c.torch_threads),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if c.served_model_name:
        argv += ["--served-model-name", *c.served_model_name]
    return argv + shlex.split(c.server_args)


def shared_gpu_note(server_args: str, mps_pipe_dir: str) -> str | None:
    """A note when both servers run on one CUDA device (the same `--device` in the flags
    they share) and no CUDA MPS daemon is listening in `mps_pipe_dir`: the GPU then
    time-slices the two processes, and decode steps wait out the prefill server's slices."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cpu")
    device = parser.parse_known_args(shlex.split(server_args))[0].device
    if not device.startswith("cuda") or os.path.exists(os.path.join(mps_pipe_dir, "control")):
        return None
    return (
        f"prefill and decode share {device} and no CUDA MPS daemon is running: the GPU "
        "time-slices their processes, which lengthens decode's inter-token latency; "
        "start one with `nvidia-cuda-mps-control -d` (docs/gpu.md)"
    )


def dp_aware(c: ClusterConfig) -> bool:
    """Whether the router picks DP ranks: as given, else where a cache-routing policy's
    choice would otherwise stop at the server (each server then picks the rank itself)."""
    if c.dp_aware is not None:
        return c.dp_aware
    return c.policy in CACHE_POLICIES and max(c.prefill_dp, c.decode_dp) > 1


def plan(c: ClusterConfig, router_port: int | None = None) -> list[Child]:
    """The three children: prefill, decode, router (stopped in the reverse order). Ports
    not given (here or in `c`) are free ports."""
    port = {
        name: getattr(c, name) or free_port(c.host)
        for name in ("port", "prefill_port", "decode_port", "bootstrap_port")
    }
    port["port"] = router_port or port["port"]
    url = {name: netaddr.http_url(netaddr.local_host(c.host), p) for name, p in port.items()}
    prefill_argv = server_argv(c, "prefill", port["prefill_port"], c.prefill_dp)
    prefill_argv += ["--bootstrap-port", str(port["bootstrap_port"])]
    router_argv = [sys.executable, "-m", "pdserve", "router", "--host", c.host]
    router_argv += ["--port", str(port["port"]), "--policy", c.policy, "--log-level", "info"]
    router_argv += ["--prefill", url["prefill_port"], str(port["bootstrap_port"])]
    router_argv += ["--decode", url["decode_port"]] + (["--dp-aware"] if dp_aware(c) else [])
    env = credentials_env(c)
    router_argv += shlex.split(c.router_args)
    return [
        Child(
            "prefill",
            prefill_argv,
            url["prefill_port"],
            ["/health", url["bootstrap_port"] + "/route"],
            env=env,
        ),
        Child(
            "decode",
            server_argv(c, "decode", port["decode_port"], c.decode_dp),
            url["decode_port"],
            ["/health"],
            env=env,
        ),
        Child("router", router_argv, url["port"], ["/readiness"], env=env),
    ]


def credentials_env(c: ClusterConfig) -> dict[str, str]:
    env = {}
    if c.api_key:
        env["PDSERVE_API_KEY"] = c.api_key
    if c.disagg_secret:
        env["PDSERVE_DISAGG_SECRET"] = c.disagg_secret
    return env


def wait_ready(children: list[Child], deadline: float, stop: threading.Event) -> bool:
    """True once every child is ready; False if stopped first. Raises ChildDied, TimeoutError."""
    procs = [child.proc for child in children if child.proc is not None]
    urls = [url for child in children for url in child.ready_urls]
    try:
        return procs_wait_ready(
            urls,
            procs,
            deadline - time.monotonic(),
            interval_s=POLL_INTERVAL_S,
            stop=stop,
            headers=children[-1].ready_headers if children else None,
        )
    except ProcessExited as exc:
        raise ChildDied(next(c for c in children if c.proc is exc.proc)) from None
    except NotReady:
        names = ", ".join(child.name for child in children if not child.ready())
        raise TimeoutError(f"not ready before the deadline: {names}") from None


def banner(children: list[Child], c: ClusterConfig, elapsed_s: float) -> str:
    prefill, decode, router = children
    pid = {child.name: child.proc.pid if child.proc else None for child in children}
    bootstrap = prefill.ready_urls[1].rsplit("/", 1)[0]
    lines = [
        f"pdserve up: ready in {elapsed_s:.1f} s ({c.model_path or 'the default model'})",
        f"  router   {router.url}  (pid {pid['router']})",
        f"  prefill  {prefill.url}  dp {c.prefill_dp}, bootstrap {bootstrap}  "
        f"(pid {pid['prefill']})",
        f"  decode   {decode.url}  dp {c.decode_dp}  (pid {pid['decode']})",
        "Try:",
        f"  curl {router.url}/v1/chat/completions -H 'Content-Type: application/json' \\",
        *(["    -H 'Authorization: Bearer <the --api-key>' \\"] if c.api_key else []),
        """    -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32, "temperature": 0}'""",
        "Ctrl-C stops everything (each drains its requests first; a second Ctrl-C ends that).",
    ]
    return "\n".join(lines)


def say(text: str, file: TextIO | None = None) -> None:
    """Print a line of `up`'s own; never raises. With its stdout gone (`| head` exited, the
    terminal closed) a BrokenPipeError skipped the SIGKILL of a child that ignored SIGTERM."""
    try:
        print(text, file=file or sys.stdout, flush=True)
    except OSError:
        pass


def stop_timeout(c: ClusterConfig) -> float:
    """--stop-timeout-s, else the longest drain a child was given plus STOP_MARGIN_S. A fixed
    15 s SIGKILLed servers told to drain longer (`--server-args '--shutdown-timeout-s 60'`)
    in the middle of their drain."""
    if c.stop_timeout_s is not None:
        return c.stop_timeout_s
    drains = [
        shutdown_timeout(c.server_args, ServerArgs.shutdown_timeout_s),
        shutdown_timeout(c.router_args, RouterConfig.shutdown_timeout_s),
    ]
    return max(drains) + STOP_MARGIN_S


def shutdown_timeout(args: str, default: float) -> float:
    """The --shutdown-timeout-s that `args` gives a child (the last one wins, as there)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--shutdown-timeout-s", type=float, default=default)
    try:
        return parser.parse_known_args(shlex.split(args))[0].shutdown_timeout_s
    except argparse.ArgumentError:  # not a number: the child refuses it at its start
        return default


def stop_all(children: list[Child], timeout_s: float) -> None:
    """SIGTERM every group (router first, so no new work reaches the servers), then SIGKILL
    whatever is left at the deadline; never returns with a child still running."""
    for child in reversed(children):
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in reversed(children):
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"pdserve up: {child.name} ignored SIGTERM; killing it")
        child.signal_group(signal.SIGKILL)  # stragglers in its group (DP workers)
        child.proc.wait()


def run(ns: argparse.Namespace) -> int:
    try:
        c = from_args(ClusterConfig, ns)
    except ValueError as exc:
        raise SystemExit(f"pdserve up: {exc}") from exc
    stop = threading.Event()
    children: list[Child] = []

    def on_signal(*_: object) -> None:
        # A second Ctrl-C (or SIGTERM) goes on to every child: each ends its drain at once
        # (requests in flight fail with 503). `up` took it alone before, and the drains ran
        # their full --shutdown-timeout-s however often the user pressed Ctrl-C.
        if stop.is_set():
            for child in children:
                child.signal_group(signal.SIGTERM)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    router_port, note = choose_router_port(
        c.port, lambda port: port_is_free(c.host, port), lambda: free_port(c.host)
    )
    if note:
        say(f"pdserve up: {note}")
    gpu_note = shared_gpu_note(c.server_args, envs.cuda_mps_pipe_directory())
    if gpu_note:
        say(f"pdserve up: {gpu_note}")
    children += plan(c, router_port)
    started_at = time.monotonic()
    try:
        for child in children:  # every fork before any thread starts (preexec_fn safety)
            child.start()
        for child in children:
            threading.Thread(target=child.echo_output, daemon=True).start()
        pids = ", ".join(f"{ch.name} (pid {ch.proc.pid})" for ch in children)  # type: ignore[union-attr]
        say(f"pdserve up: started {pids}; waiting for them to be ready")
        if not wait_ready(children, started_at + c.ready_timeout_s, stop):
            return 0
        say(banner(children, c, time.monotonic() - started_at))
        while not stop.wait(POLL_INTERVAL_S):
            for child in children:
                if child.exit_code() is not None:
                    raise ChildDied(child)
        return 0
    except (ChildDied, TimeoutError) as exc:
        say(f"pdserve up: {exc}", sys.stderr)
        return 1
    finally:
        stop_all(children, stop_timeout(c))
