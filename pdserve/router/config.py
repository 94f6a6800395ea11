"""Options of the PD router (`pdserve router`), one frozen dataclass; the CLI is generated
from it. Worker lists are given by hand-written flags (`--prefill URL [PORT]`)."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from pdserve import envs
from pdserve.auth import API_KEY_FORM, api_key_ok
from pdserve.config import check, opt
from pdserve.cors import DEFAULT_ALLOWED_ORIGINS

POLICIES = ["round_robin", "random", "power_of_two", "cache_aware", "kv_aware"]
# Policies that choose by what a server (and, with --dp-aware, a DP rank) holds cached.
CACHE_POLICIES = ("cache_aware", "kv_aware")
Role = Literal["prefill", "decode", "regular"]
ROLES = ("prefill", "decode", "regular")


@dataclass(frozen=True)
class WorkerSpec:
    """One server the router sends to. `bootstrap_port` is None when not given: the router
    then sends `bootstrap_port: null` and the decode server uses its own default."""

    url: str
    role: Role
    bootstrap_port: int | None = None

    def __post_init__(self) -> None:
        # POST /workers builds one from client JSON: wrong types are ValueErrors (400s) too.
        check(isinstance(self.url, str), f"worker URL must be a string, got {self.url!r}")
        parts = urlsplit(self.url)
        check(
            parts.scheme in ("http", "https") and bool(parts.hostname) and _port_ok(parts),
            f"worker URL must look like http://host:port (port in [1, 65535]), got {self.url!r}",
        )
        check(self.role in ROLES, f"worker role must be one of {ROLES}, got {self.role!r}")
        port = self.bootstrap_port
        check(
            port is None or (type(port) is int and 0 < port < 65536),
            f"bootstrap port must be an integer in [1, 65535], got {port!r}",
        )
        check(
            self.role == "prefill" or self.bootstrap_port is None,
            "only prefill workers have a bootstrap port",
        )
        object.__setattr__(self, "url", self.url.rstrip("/"))

    @functools.cached_property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


def _port_ok(parts: SplitResult) -> bool:
    """A URL's port is absent (the scheme's) or in [1, 65535]: urlsplit takes any text
    there, and a router given http://host:99999 started and kept the worker unhealthy."""
    try:
        return parts.port != 0
    except ValueError:  # not a number, or out of range
        return False


@dataclass(frozen=True)
class RouterConfig:
    # Filled from --prefill/--decode/--worker (hand-written flags, see router/cli.py).
    workers: tuple[WorkerSpec, ...] = dataclasses.field(default=())

    host: str = opt("127.0.0.1", "address the router listens on")
    port: int = opt(30000, "HTTP port of the router")
    api_key: str | None = opt(
        envs.api_key(),
        "clients must send 'Authorization: Bearer <key>' (every route but /health), and the "
        "router sends it to its workers (default: env PDSERVE_API_KEY; unset: no key)",
        repr=False,
    )
    allowed_origins: list[str] = opt(
        list(DEFAULT_ALLOWED_ORIGINS),
        "origins whose web pages may call the router from a browser (CORS: an allowed "
        "origin gets Access-Control-Allow-Origin on every answer and a 200 to its preflight "
        "OPTIONS), as vLLM's --allowed-origins and SGLang's router: * = any (the default); "
        "none given: no CORS headers",
    )
    policy: str = opt("round_robin", "worker choice policy for both roles", choices=POLICIES)
    prefill_policy: str | None = opt(
        None, "policy for prefill servers; unset: --policy", choices=POLICIES
    )
    decode_policy: str | None = opt(
        None, "policy for decode servers; unset: --policy", choices=POLICIES
    )
    dp_aware: bool = opt(
        False,
        "pick DP ranks too: set routed_dp_rank and "
        "disagg_prefill_dp_rank so no server-side rank query is needed",
    )
    align_room: bool = opt(
        False,
        "draw each room so that room %% prefill_dp_size == the "
        "chosen prefill rank, or the client's routed_dp_rank, which then goes to prefill "
        "only (keeps follow_bootstrap_room's fast path)",
    )
    cache_threshold: float = opt(
        0.5,
        "cache_aware: minimum fraction of the prompt matched on one worker (with --dp-aware, "
        "one DP rank) for the match to decide",
    )
    balance_abs_threshold: int = opt(
        256,
        "cache_aware: ignore prefixes and balance when the load spread (with --dp-aware, "
        "of the ranks' tokens in flight) exceeds this many tokens ...",
    )
    balance_rel_threshold: float = opt(
        1.5, "... and the busiest worker (or rank) has this many times the idlest's load"
    )
    local_prefill_threshold: int = opt(
        0,
        "kv_aware decode: when the chosen decode server holds all but at most this many "
        "prompt tokens of a request of one prompt, it computes the rest itself and no "
        "prefill server is used (0: off; a batch of several prompts takes both legs)",
    )
    tokenizer_path: str | None = opt(
        None,
        "kv_aware: the servers' tokenizer directory, to hash text and chat prompts as they "
        "do (default: the tokenizer_path a worker's /server_info names, when it exists on "
        "this host); without one such prompts are routed by load alone",
    )
    prefix_table_blocks: int = opt(65536, "cache_aware: most prompt blocks remembered (LRU)")
    prefix_block_len: int = opt(16, "cache_aware: characters (or token ids) per prompt block")
    load_refresh_interval_s: float = opt(1.0, "period of GET /get_load on every worker")
    health_check_interval_s: float = opt(2.0, "period of GET /health on every worker")
    health_check_timeout_s: float = opt(2.0, "deadline of one health check")
    health_generate_timeout_s: float = opt(
        30.0, "deadline of each worker's GET /health_generate when the router's is asked"
    )
    flush_cache_timeout_s: float = opt(
        30.0, "deadline of each worker's POST /flush_cache when the router's is asked"
    )
    health_failure_threshold: int = opt(2, "failed checks in a row that take a worker out")
    health_success_threshold: int = opt(1, "passed checks in a row that bring it back")
    max_retries: int = opt(3, "extra attempts (new pair, new rooms) while nothing was sent")
    retry_backoff_s: float = opt(0.05, "wait before retry k: retry_backoff_s * 2**(k-1)")
    cb_failure_threshold: int = opt(
        5, "request failures in a row that open a worker's circuit breaker"
    )
    cb_success_threshold: int = opt(2, "successes in half-open state that close it")
    cb_open_s: float = opt(10.0, "how long an open breaker keeps the worker out")
    shutdown_timeout_s: float = opt(
        10.0,
        "on SIGTERM or SIGINT, how long the requests in flight may still run (no new "
        "connection is taken); past it, or at a second signal, they are answered 503 (a "
        "stream: an error event, then [DONE])",
    )
    connect_timeout_s: float = opt(5.0, "deadline to connect to a worker")
    request_timeout_s: float = opt(600.0, "deadline of one attempt, streaming included")
    abort_timeout_s: float = opt(2.0, "deadline of POST /abort_request to a worker")
    startup_timeout_s: float = opt(
        600.0,
        "deadline for a worker given at start or added via POST /workers to answer /server_info",
    )
    prometheus_host: str = opt("127.0.0.1", "address of the separate metrics listener")
    prometheus_port: int | None = opt(
        None, "also serve /metrics on this port (it is always served on the main port)"
    )

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, f"--port out of range: {self.port}")
        check(
            self.prometheus_port is None or 0 < self.prometheus_port < 65536,
            f"--prometheus-port out of range: {self.prometheus_port}",
        )
        for flag, host in (("--host", self.host), ("--prometheus-host", self.prometheus_host)):
            check(bool(host), f"{flag} must not be empty (0.0.0.0: every interface)")
        check(api_key_ok(self.api_key), API_KEY_FORM)
        check(all(self.allowed_origins), "--allowed-origins: an origin must not be empty")
        roles = {w.role for w in self.workers}
        check(
            "regular" not in roles or roles == {"regular"},
            "--worker (plain mode) cannot be mixed with --prefill/--decode",
        )
        check(len({w.url for w in self.workers}) == len(self.workers), "duplicate worker URL")
        check(0.0 <= self.cache_threshold <= 1.0, "--cache-threshold must be in [0, 1]")
        check(
            self.prefix_block_len > 0 and self.prefix_table_blocks > 0,
            "prefix table sizes must be > 0",
        )
        check(self.local_prefill_threshold >= 0, "--local-prefill-threshold must be >= 0")
        check(  # else passed over like a worker's path on another host: routed by load alone
            self.tokenizer_path is None or os.path.isdir(self.tokenizer_path),
            f"--tokenizer-path {self.tokenizer_path!r} is not a directory on this host",
        )
        check(
            not self.local_prefill_threshold or self.policy_for("decode") == "kv_aware",
            "--local-prefill-threshold needs the kv_aware decode policy (--policy kv_aware or "
            "--decode-policy kv_aware): no other policy knows what a decode server holds",
        )
        check(self.max_retries >= 0, "--max-retries must be >= 0")
        check(
            min(
                self.health_failure_threshold,
                self.health_success_threshold,
                self.cb_failure_threshold,
                self.cb_success_threshold,
            )
            >= 1,
            "thresholds must be >= 1",
        )
        for name in (
            "load_refresh_interval_s",
            "health_check_interval_s",
            "health_check_timeout_s",
            "health_generate_timeout_s",
            "flush_cache_timeout_s",
            "connect_timeout_s",
            "request_timeout_s",
            "abort_timeout_s",
            "startup_timeout_s",
            "cb_open_s",
            "shutdown_timeout_s",
        ):
            check(getattr(self, name) > 0, f"{name} must be > 0")

    def policy_for(self, role: Role) -> str:
        if role == "prefill" and self.prefill_policy:
            return self.prefill_policy
        if role == "decode" and self.decode_policy:
            return self.decode_policy
        return self.policy

    def unsteered_ranks(self, role: Role, dp_size: int) -> str | None:
        """Why a cache policy's choice stops at a server of `dp_size` ranks, or None: the
        server picks the rank itself (prefill by room mod dp_size, others by its own
        balance), so the prefix the router routed on is hit only by chance."""
        policy = self.policy_for(role)
        if dp_size < 2 or policy not in CACHE_POLICIES or self.dp_aware:
            return None
        if role == "prefill" and self.align_room:  # rooms drawn on the chosen rank
            return None
        flags = "--dp-aware or --align-room" if role == "prefill" else "--dp-aware"
        return (
            f"the {role} policy {policy} picks servers by their cache, but this server runs "
            f"{dp_size} DP ranks, each with its own cache, and without {flags} the server "
            "picks the rank: the cached prefix is hit only by chance"
        )
