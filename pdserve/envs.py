"""Every environment variable pdserve reads, in one place.

Flags win over environment variables; environment variables win over built-in defaults.
"""

from __future__ import annotations

import math
import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_SECONDS = 1e9  # as a duration flag's (pdserve.config, a peer module: not imported)


class EnvError(ValueError):
    """An environment variable's value cannot be read; the message names the variable.
    Raised while the config modules import (their defaults read the environment): `pdserve`
    turns it into a one-line error."""


def _first_set(name: str, *aliases: str) -> tuple[str, str] | None:
    """(variable, value) of the first of `name` and its `aliases` set and not empty."""
    for key in (name, *aliases):
        value = os.environ.get(key)
        if value is not None and value != "":
            return key, value
    return None


def _get(name: str) -> str | None:
    found = _first_set(name)
    return None if found is None else found[1]


def env_bool(name: str, *aliases: str, default: bool = False) -> bool:
    found = _first_set(name, *aliases)
    if found is None:
        return default
    key, value = found
    word = value.strip().lower()
    if word not in _TRUE | _FALSE:
        raise EnvError(f"{key}={value!r}: expected one of 1, true, yes, on, 0, false, no, off")
    return word in _TRUE


def env_seconds(name: str, default: float) -> float:
    """A duration, as its flag takes it: finite and at most `MAX_SECONDS`."""
    found = _first_set(name)
    if found is None:
        return default
    try:
        number = float(found[1])
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number > MAX_SECONDS:
        raise EnvError(f"{name}={found[1]!r}: expected a number of seconds up to {MAX_SECONDS:g}")
    return number


def force_query_prefill_dp_rank() -> bool:
    """docs/protocol.md section 4: FORCE. SGLang's variable name is honoured as an alias."""
    return env_bool(
        "PDSERVE_FORCE_QUERY_PREFILL_DP_RANK",
        "SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK",
    )


# Deadlines (seconds) for the disaggregation protocol; each also has a CLI flag.
def bootstrap_timeout_s() -> float:
    """Prefill waiting for decode's page list; decode waiting for server info and ranks."""
    return env_seconds("PDSERVE_BOOTSTRAP_TIMEOUT_S", 30.0)


def kv_wait_timeout_s() -> float:
    """Decode waiting for KV after sending its page list."""
    return env_seconds("PDSERVE_KV_WAIT_TIMEOUT_S", 30.0)


def heartbeat_interval_s() -> float:
    return env_seconds("PDSERVE_HEARTBEAT_INTERVAL_S", 0.5)


def heartbeat_timeout_s() -> float:
    """No heartbeat answer from a prefill worker for this long: its rooms fail on decode."""
    return env_seconds("PDSERVE_HEARTBEAT_TIMEOUT_S", 3.0)


def room_ttl_s() -> float:
    """Bootstrap room entries expire this long after their last use."""
    return env_seconds("PDSERVE_ROOM_TTL_S", 120.0)


def model_cache_dir() -> str:
    """Where converted models (the SmolLM2 GGUF -> HF directory) are cached."""
    return _get("PDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")


# Credentials (docs/protocol.md section 11); each also has a CLI flag, which wins.
def api_key() -> str | None:
    """The key clients must send as `Authorization: Bearer <key>` (server, router); the key
    `pdserve bench` sends."""
    return _get("PDSERVE_API_KEY")


def disagg_secret() -> str | None:
    """The secret shared by prefill and decode servers: bootstrap writes and the KV handshake
    carry an HMAC proof of it."""
    return _get("PDSERVE_DISAGG_SECRET")


def cuda_ipc_direct_launch() -> bool:
    """cuda_ipc: launch page copies through the compiled Triton kernel's own launcher and set
    completion flags with a stream write (off: Triton's JIT and a fill kernel per send)."""
    return env_bool("PDSERVE_CUDA_IPC_DIRECT_LAUNCH", default=True)


def worker_multiproc_method() -> str | None:
    """How a server starts its DP workers: `forkserver` (the default: forks of a process that
    imported torch once) or `spawn` (a fresh interpreter each); vLLM's
    VLLM_WORKER_MULTIPROC_METHOD."""
    return _get("PDSERVE_WORKER_MULTIPROC_METHOD")


def cuda_mps_pipe_directory() -> str:
    """Where CUDA's MPS control daemon listens (CUDA's own variable): `pdserve up` checks for
    it before it puts several servers on one GPU."""
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
