"""Options of the disaggregation layer (bootstrap, rank resolution, KV transfer deadlines),
and `PDServerConfig`: a server's config with them, as prefill and decode servers run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
from dataclasses import dataclass

from pdserve import envs
from pdserve.config import add_arguments, check, check_ports, from_args, opt
from pdserve.netaddr import advertisable
from pdserve.serving.config import ServerConfig, add_server_arguments, server_config_from_args

TRANSFER_BACKENDS = ["zmq", "fake", "cuda_ipc", "nixl"]
MAX_HEARTBEAT_TIMEOUT_S = 6553.5
RANK_MISMATCH_MODES = ["abort", "forward"]
# An empty secret turned the check off (and, as a flag, overrode PDSERVE_DISAGG_SECRET):
# `--disagg-secret "$SECRET"` with $SECRET unset ran without one, silently.
EMPTY_SECRET = "--disagg-secret must not be empty (leave it unset for no secret)"


@dataclass(frozen=True)
class DisaggConfig:
    bootstrap_port: int = opt(
        8998,
        "prefill: port of the bootstrap server it hosts",
        aliases=("--disaggregation-bootstrap-port",),
    )
    bootstrap_host: str | None = opt(
        None,
        "prefill: host advertised for the bootstrap server and KV endpoints only "
        "(default: --advertise-host)",
    )
    transfer_backend: str = opt(
        "zmq",
        "KV transfer backend",
        choices=TRANSFER_BACKENDS,
        aliases=("--disaggregation-transfer-backend",),
    )
    force_query_prefill_dp_rank: bool = opt(
        envs.force_query_prefill_dp_rank(),
        "register/query the prefill DP rank of every room even under follow_bootstrap_room "
        "(env PDSERVE_FORCE_QUERY_PREFILL_DP_RANK)",
    )
    rank_mismatch: str = opt(
        "abort",
        "prefill, under follow_bootstrap_room without FORCE: a request routed to a worker other "
        "than room mod dp_size fails (abort), or is served, its page list relayed from the room's "
        "home worker (forward)",
        choices=RANK_MISMATCH_MODES,
    )
    bootstrap_timeout_s: float = opt(
        envs.bootstrap_timeout_s(),
        "deadline for bootstrap steps: prefill awaiting decode's page list (or the request "
        "after one), decode awaiting server info, rank answers and the KV handshake "
        "(env PDSERVE_BOOTSTRAP_TIMEOUT_S)",
    )
    kv_wait_timeout_s: float = opt(
        envs.kv_wait_timeout_s(),
        "decode: deadline for KV to arrive after sending the page list (env PDSERVE_KV_WAIT_TIMEOUT_S)",
    )
    heartbeat_interval_s: float = opt(
        envs.heartbeat_interval_s(),
        "ZeroMQ heartbeat period on KV connections (env PDSERVE_HEARTBEAT_INTERVAL_S)",
    )
    heartbeat_timeout_s: float = opt(
        envs.heartbeat_timeout_s(),
        "a KV connection without heartbeat answers this long is dead: its rooms fail with a "
        "reason; answered by libzmq's I/O thread, so a busy worker stays alive "
        "(env PDSERVE_HEARTBEAT_TIMEOUT_S)",
    )
    room_ttl_s: float = opt(
        envs.room_ttl_s(),
        "bootstrap room entries expire after this idle time (env PDSERVE_ROOM_TTL_S)",
    )
    kv_send_wait_s: float = opt(
        0.5,
        "prefill: before computing the next prompt, wait up to this long for KV sends under "
        "way to finish (else the rest of a send waits for that whole forward pass)",
    )
    kv_share_wait_s: float = opt(
        10.0,
        "decode: a prompt sharing pages, past what the prefix cache holds, with KV another "
        "room of the same prefill worker is receiving waits for it to land, then reserves "
        "past them (they are not sent twice); at most this long and half the bootstrap "
        "timeout; 0: never waits",
    )
    disagg_secret: str | None = opt(
        envs.disagg_secret(),
        "secret shared by every prefill and decode server: bootstrap writes and the KV "
        "handshake carry an HMAC proof of it, the secret itself never travels (default: env "
        "PDSERVE_DISAGG_SECRET; unset: nothing is checked)",
        repr=False,
    )

    def __post_init__(self) -> None:
        check(
            0 < self.bootstrap_port < 65536, f"--bootstrap-port out of range: {self.bootstrap_port}"
        )
        check(
            self.transfer_backend in TRANSFER_BACKENDS,
            f"--transfer-backend must be one of {TRANSFER_BACKENDS}, got {self.transfer_backend!r}",
        )
        if self.transfer_backend == "nixl":
            from pdserve.disagg.transfer.nixl_agent import nixl_missing

            check(nixl_missing() is None, f"--transfer-backend nixl: {nixl_missing()}")
        check(
            self.rank_mismatch in RANK_MISMATCH_MODES,
            f"--rank-mismatch must be one of {RANK_MISMATCH_MODES}, got {self.rank_mismatch!r}",
        )
        for name in (
            "bootstrap_timeout_s",
            "kv_wait_timeout_s",
            "heartbeat_interval_s",
            "heartbeat_timeout_s",
            "room_ttl_s",
        ):
            check(getattr(self, name) > 0, f"{name} must be > 0")
        check(self.kv_share_wait_s >= 0, "kv_share_wait_s must be >= 0")
        check(self.disagg_secret != "", EMPTY_SECRET)
        why = advertisable("--bootstrap-host", self.bootstrap_host)
        check(why is None, str(why))
        check(
            self.heartbeat_timeout_s > self.heartbeat_interval_s,
            "heartbeat_timeout_s must exceed heartbeat_interval_s",
        )
        # ZeroMQ takes both in whole milliseconds (an interval of 0 turns heartbeats off)
        # and refuses a TTL past 6553.599 s ("Invalid argument" in every worker's start).
        check(self.heartbeat_interval_s >= 0.001, "--heartbeat-interval-s must be >= 0.001")
        check(
            self.heartbeat_timeout_s <= MAX_HEARTBEAT_TIMEOUT_S,
            f"--heartbeat-timeout-s must be <= {MAX_HEARTBEAT_TIMEOUT_S} (ZeroMQ's limit)",
        )


def new_epoch() -> int:
    """A random 63-bit restart epoch (nonzero: 0 is what a peer without epochs sends)."""
    return secrets.randbits(63) | 1


@dataclass(frozen=True)
class PDServerConfig(ServerConfig):
    """Serving's config plus the disaggregation options; serving sees it as a ServerConfig.
    Picklable, like its base: it travels to every worker process."""

    disagg: DisaggConfig
    # Drawn once per server start (this config is built once, then pickled to every worker):
    # peers that see a new epoch for the same server drop what they held of the old one.
    epoch: int = dataclasses.field(default_factory=new_epoch)

    def __post_init__(self) -> None:
        server = self.server
        check_ports(
            {
                "--port": server.port,
                "--bootstrap-port": self.disagg.bootstrap_port
                if server.mode == "prefill"
                else None,
                "--kv-events-port": server.kv_events_port,
                "--kv-events-replay-port": server.kv_events_replay_port,
            }
        )
        check(  # else every worker failed its start: "needs a contiguous CUDA pool"
            server.mode == "colocated"
            or self.disagg.transfer_backend != "cuda_ipc"
            or self.engine.device.startswith("cuda"),
            "--transfer-backend cuda_ipc needs --device cuda (it moves KV between GPUs)",
        )


def add_pd_server_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    add_arguments(parser, DisaggConfig, "disaggregation options")


def pd_server_config_from_args(ns: argparse.Namespace) -> PDServerConfig:
    """Raises ValueError (from the dataclasses' checks) on contradictory options."""
    base = server_config_from_args(ns)
    # A prefill server's requests stop after their first token: it never runs a decode step.
    engine = dataclasses.replace(base.engine, runs_decode=base.server.mode != "prefill")
    return PDServerConfig(server=base.server, engine=engine, disagg=from_args(DisaggConfig, ns))
