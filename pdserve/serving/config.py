"""Options of one pdserve server (front end + DP workers), composed into `ServerConfig`.

Built once in the front-end process from the CLI and handed, frozen, to every worker. A
layer above serving may extend `ServerConfig` with its own options (disaggregation does).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pdserve import envs
from pdserve.auth import API_KEY_FORM, api_key_ok
from pdserve.config import add_arguments, check, from_args, opt
from pdserve.cors import DEFAULT_ALLOWED_ORIGINS
from pdserve.engine.config import EngineConfig
from pdserve.netaddr import advertisable

MODES = ["colocated", "prefill", "decode"]
# How the DP controller picks a worker: the one list of names (the bootstrap registry and
# the policy check against it too); "auto" resolves to one of them per mode.
LB_METHODS = ["round_robin", "shortest_queue", "total_tokens", "follow_bootstrap_room"]
# SGLang's names for the same methods: its current `total_requests`, its older `minimum_tokens`.
LB_METHOD_ALIASES = {"total_requests": "shortest_queue", "minimum_tokens": "total_tokens"}
LB_METHOD_CHOICES = ["auto", *LB_METHODS, *LB_METHOD_ALIASES]
SAMPLING_DEFAULTS_CHOICES = ["model", "openai"]
LOG_LEVELS = ["debug", "info", "warning", "error"]
# How often every worker sends WorkerAlive. --worker-heartbeat-timeout-s must span two beats:
# at 0.3 s a healthy worker was unresponsive between every two, and /health and requests
# flapped between 200 and 503 "no worker is running".
WORKER_ALIVE_INTERVAL_S = 1.0
MIN_WORKER_HEARTBEAT_TIMEOUT_S = 2 * WORKER_ALIVE_INTERVAL_S


@dataclass(frozen=True)
class ServerArgs:
    mode: str = opt(
        "colocated",
        "colocated (no disaggregation), prefill or decode",
        choices=MODES,
        aliases=("--disaggregation-mode",),
    )
    host: str = opt(
        "127.0.0.1",
        "address every listener of this server binds: HTTP, the KV event sockets, and on "
        "prefill the bootstrap server and the KV control and data ports (0.0.0.0: all "
        "IPv4 interfaces; an IPv6 address unbracketed, :: for all IPv6 ones)",
    )
    advertise_host: str | None = opt(
        None,
        "address peers are told to reach this server's listeners at (NAT, containers); "
        "default: --host, or for 0.0.0.0 (::) this machine's routable IPv4 (IPv6) address",
    )
    api_key: str | None = opt(
        envs.api_key(),
        "every route but /health requires 'Authorization: Bearer <key>' (default: env "
        "PDSERVE_API_KEY; unset: no key)",
        repr=False,
    )
    allowed_origins: list[str] = opt(
        list(DEFAULT_ALLOWED_ORIGINS),
        "origins whose web pages may call this server from a browser (CORS: an allowed "
        "origin gets Access-Control-Allow-Origin on every answer and a 200 to its preflight "
        "OPTIONS), as vLLM's --allowed-origins and SGLang's: * = any (the default); none "
        "given: no CORS headers",
    )
    port: int = opt(30000, "HTTP port to bind")
    dp_size: int = opt(
        1,
        "number of data-parallel worker processes (one engine each)",
        aliases=("--data-parallel-size",),  # SGLang's long name
    )
    load_balance_method: str = opt(
        "auto",
        "how the DP controller picks a worker; auto = follow_bootstrap_room on prefill, "
        "round_robin otherwise; total_requests and minimum_tokens (SGLang's names) mean "
        "shortest_queue and total_tokens",
        choices=LB_METHOD_CHOICES,
    )
    served_model_name: list[str] = opt(
        [],
        "model names of the OpenAI routes and /v1/models (default: the --model-path value); "
        "requests may give any of them or the --model-path value, answers and /server_info "
        "and /metrics' model_name label give the first (as vLLM's)",
    )
    sampling_defaults: str = opt(
        "model",
        "where a request's omitted temperature, top_p, top_k, min_p and repetition_penalty "
        "come from: model = the model's generation_config.json where it sets them (as "
        "transformers' generate, vLLM and SGLang do), else the OpenAI defaults; openai = "
        "always the OpenAI defaults (default: model)",
        choices=SAMPLING_DEFAULTS_CHOICES,
    )
    log_level: str = opt("info", "logging level", choices=LOG_LEVELS)
    worker_start_timeout_s: float = opt(
        600.0, "deadline for every worker to load its model and report ready"
    )
    request_timeout_s: float = opt(
        600.0, "deadline for one request; past it the request is aborted with a 504"
    )
    health_generate_timeout_s: float = opt(
        20.0, "deadline for the one-token generation of GET /health_generate"
    )
    idle_timeout_s: float = opt(
        75.0,
        "a connection to the HTTP port without a whole request this long is closed: idle "
        "keep-alive connections, and clients that send part of a request head and stall",
    )
    send_timeout_s: float = opt(
        60.0,
        "a client that takes none of its answer's bytes this long while more is to be "
        "written is hung up on, and its request aborted (nginx's send_timeout)",
    )
    shutdown_timeout_s: float = opt(
        10.0,
        "on SIGTERM or SIGINT, how long the requests in flight may still run (new ones, "
        "and /health, are answered 503); past it, or at a second signal, they fail with a 503",
    )
    worker_heartbeat_timeout_s: float = opt(
        10.0,
        "a worker process silent this long (stopped, or stuck holding the GIL; a long step "
        "still beats) is unresponsive: its requests fail with a 503, new ones avoid it and "
        "/health answers 503, until it beats again (0: never)",
    )
    watchdog_timeout_s: float = opt(
        300.0,
        "a worker with work whose loop has not turned this long (stuck in Python, or in one "
        "very long step, while its heartbeat still beats) is unresponsive as above, and its "
        "stacks go to the log, until its loop turns again (0: never)",
        flag="--watchdog-timeout",
    )
    load_report_interval_s: float = opt(
        0.05, "how often an active worker reports its load to the front end"
    )
    kv_events_port: int = opt(
        0, "port of the ZeroMQ PUB socket for KV cache events (0: any free port)"
    )
    kv_events_replay_port: int = opt(
        0, "port of the ZeroMQ ROUTER socket that replays recent KV event batches (0: any)"
    )

    def __post_init__(self) -> None:
        check(
            all(name.strip() for name in self.served_model_name),
            "--served-model-name: a name must not be empty",
        )
        check(api_key_ok(self.api_key), API_KEY_FORM)
        check(all(self.allowed_origins), "--allowed-origins: an origin must not be empty")
        check(self.mode in MODES, f"--mode must be one of {MODES}, got {self.mode!r}")
        check(0 < self.port < 65536, f"--port out of range: {self.port}")
        check(bool(self.host), "--host must not be empty (0.0.0.0: every interface)")
        why = advertisable("--advertise-host", self.advertise_host)
        check(why is None, str(why))
        for name in ("kv_events_port", "kv_events_replay_port"):
            check(0 <= getattr(self, name) < 65536, f"--{name.replace('_', '-')} out of range")
        check(self.dp_size >= 1, f"--dp-size must be >= 1, got {self.dp_size}")
        check(
            self.load_balance_method in LB_METHOD_CHOICES,
            f"--load-balance-method must be one of {LB_METHOD_CHOICES}, got {self.load_balance_method!r}",
        )
        check(
            self.sampling_defaults in SAMPLING_DEFAULTS_CHOICES,
            f"--sampling-defaults must be one of {SAMPLING_DEFAULTS_CHOICES}, "
            f"got {self.sampling_defaults!r}",
        )
        for name in (
            "worker_start_timeout_s",
            "request_timeout_s",
            "health_generate_timeout_s",
            "idle_timeout_s",
            "send_timeout_s",
            "load_report_interval_s",
        ):
            check(getattr(self, name) > 0, f"{name} must be > 0")
        check(
            self.worker_heartbeat_timeout_s == 0
            or self.worker_heartbeat_timeout_s >= MIN_WORKER_HEARTBEAT_TIMEOUT_S,
            f"--worker-heartbeat-timeout-s must be 0 (never) or >= {MIN_WORKER_HEARTBEAT_TIMEOUT_S:g}"
            f" (workers beat every {WORKER_ALIVE_INTERVAL_S:g} s)",
        )
        check(self.shutdown_timeout_s >= 0, "--shutdown-timeout-s must be >= 0")
        check(self.watchdog_timeout_s >= 0, "--watchdog-timeout must be >= 0")

    @property
    def resolved_lb_method(self) -> str:
        """The method itself: never `auto` or an alias (the bootstrap server compares it)."""
        if self.load_balance_method != "auto":
            return LB_METHOD_ALIASES.get(self.load_balance_method, self.load_balance_method)
        return "follow_bootstrap_room" if self.mode == "prefill" else "round_robin"


@dataclass(frozen=True)
class ServerConfig:
    server: ServerArgs
    engine: EngineConfig

    @property
    def served_model_name(self) -> str:
        """The name answers give: the first --served-model-name, else --model-path."""
        return self.model_names[0]

    @property
    def model_names(self) -> list[str]:
        """Names a request's `model` may give: the served names in order, then their alias,
        the --model-path value."""
        return list(dict.fromkeys([*self.server.served_model_name, self.engine.model_path]))


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ServerArgs, "server options")
    add_arguments(parser, EngineConfig, "engine options")


def server_config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """Raises ValueError (from the dataclasses' checks) on contradictory options."""
    return ServerConfig(server=from_args(ServerArgs, ns), engine=from_args(EngineConfig, ns))
