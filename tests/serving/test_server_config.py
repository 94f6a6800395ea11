"""A server's options (`pdserve serve`, ServerArgs + DisaggConfig): listeners it cannot
open as asked are refused before any worker starts, naming the flags."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.disagg.config import PDServerConfig, pd_server_config_from_args


def server_config(*argv: str) -> PDServerConfig:
    return pd_server_config_from_args(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--mode", "prefill", "--port", "31080", "--bootstrap-port", "31080"],
            "--port and --bootstrap-port are both 31080: one port each",
        ),
        (["--port", "31080", "--kv-events-port", "31080"], "--port and --kv-events-port are"),
        (
            ["--kv-events-port", "31081", "--kv-events-replay-port", "31081"],
            "--kv-events-port and --kv-events-replay-port are both 31081",
        ),
        (["--host", ""], "--host must not be empty"),
    ],
)
def test_ports_and_host_it_cannot_listen_on_are_refused_at_once(argv, error):
    """Each failed only after the workers had loaded the model: "--port P: cannot listen on
    ...: address already in use" (taken by the server itself), or for host "" a ZeroMQ
    "No such device" naming --kv-events-port."""
    with pytest.raises(ValueError, match=error):
        server_config(*argv)


def test_a_decode_server_ignores_the_bootstrap_port_it_does_not_open():
    config = server_config("--mode", "decode", "--port", "31080", "--bootstrap-port", "31080")
    assert config.server.port == config.disagg.bootstrap_port == 31080


@pytest.mark.parametrize("device", ["cudax", "cuda:", "cuda:a", "cuda0", "CPU"])
def test_a_device_other_than_cpu_or_cuda_n_is_refused_at_once(device):
    """Anything starting "cuda" passed: the worker then failed in a torch traceback."""
    with pytest.raises(ValueError, match=f"--device must be cpu or cuda\\[:N\\], got '{device}'"):
        server_config("--device", device)
    assert server_config("--device", "cuda:1").engine.device == "cuda:1"


def test_an_empty_disagg_secret_is_refused_not_taken_for_none():
    """As a flag it overrode PDSERVE_DISAGG_SECRET and turned every proof off, silently."""
    with pytest.raises(ValueError, match="--disagg-secret must not be empty"):
        server_config("--mode", "prefill", "--disagg-secret", "")


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_a_random_seed_past_64_bits_is_refused_at_once(seed):
    """It failed the worker with torch's "Overflow when unpacking long long" traceback."""
    with pytest.raises(ValueError, match=f"--random-seed must be a 64-bit integer, got {seed}"):
        server_config("--random-seed", seed)
    assert server_config("--random-seed", str(2**64 - 1)).engine.random_seed == 2**64 - 1


@pytest.mark.parametrize(
    ("flag", "host"), [("--advertise-host", "0.0.0.0"), ("--bootstrap-host", "::")]
)
def test_a_wildcard_advertised_to_peers_is_refused(flag, host):
    """Peers were told to connect to 0.0.0.0: on this machine that reached the server by
    luck, on another each decode server dialled itself."""
    with pytest.raises(ValueError, match=f"{flag} '{host}' is a wildcard, not an address"):
        server_config("--mode", "prefill", "--host", "0.0.0.0", flag, host)
    assert server_config("--host", "0.0.0.0", flag, "10.0.0.7").server.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--heartbeat-timeout-s", "10000"], "--heartbeat-timeout-s must be <= 6553.5"),
        (
            ["--heartbeat-interval-s", "0.0001", "--heartbeat-timeout-s", "0.01"],
            "--heartbeat-interval-s must be >= 0.001",
        ),
    ],
)
def test_kv_heartbeats_zeromq_cannot_keep_are_refused_at_once(argv, error):
    """A timeout past ZeroMQ's TTL limit failed every worker's start with a bare "ZMQError:
    Invalid argument"; an interval under 1 ms became 0 ms, which turns heartbeats off."""
    with pytest.raises(ValueError, match=error):
        server_config("--mode", "prefill", *argv)


def test_cuda_ipc_transfer_on_the_cpu_is_refused_at_once():
    with pytest.raises(ValueError, match="--transfer-backend cuda_ipc needs --device cuda"):
        server_config("--mode", "decode", "--transfer-backend", "cuda_ipc")
    cuda = server_config("--mode", "prefill", "--transfer-backend", "cuda_ipc", "--device", "cuda")
    assert cuda.disagg.transfer_backend == "cuda_ipc"


@pytest.mark.parametrize("timeout_s", ["0.3", "1.5"])
def test_a_worker_heartbeat_timeout_shorter_than_two_beats_is_refused(timeout_s):
    """At 0.3 s a healthy idle worker went unresponsive between every two beats (one a
    second): /health and /generate flapped between 200 and 503 "no worker is running"."""
    with pytest.raises(ValueError, match="must be 0 \\(never\\) or >= 2 \\(workers beat every 1 s"):
        server_config("--worker-heartbeat-timeout-s", timeout_s)
    assert server_config("--worker-heartbeat-timeout-s", "0").server.worker_heartbeat_timeout_s == 0
    assert server_config("--worker-heartbeat-timeout-s", "2").server.worker_heartbeat_timeout_s == 2
