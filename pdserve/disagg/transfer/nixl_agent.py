"""A thin shell around one NIXL agent (UCX backend) that owns a worker's registered KV pool.
Runs in prefill and decode worker processes under `--transfer-backend nixl`.

The pool is registered once (CPU pools as DRAM, GPU pools as VRAM). `NixlPool` is what a
peer needs to read from it: the agent's metadata plus where the pages are.
"""

from __future__ import annotations

import importlib.util
import logging
import uuid

import msgspec
import numpy as np
import torch

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the nixl KV transfer backend needs NIXL: pip install 'pdserve[nixl]' "
    "(or: pip install --no-deps nixl-cu12==1.5.1); see the README"
)
# `nixl` dispatches to the build matching the CUDA found; `nixl_cu12` is that build itself,
# which also runs where there is no CUDA at all.
_MODULES = ("nixl", "nixl_cu12")


def nixl_missing() -> str | None:
    """Why NIXL cannot be used here, or None."""
    if all(importlib.util.find_spec(name) is None for name in _MODULES):
        return INSTALL_HINT
    return None


def _api():
    for name in _MODULES:
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name + "._api")
    raise ImportError(INSTALL_HINT)


class NixlPool(msgspec.Struct, frozen=True, kw_only=True):
    """One side's agent and registered pool, carried in the KV handshake."""

    agent_name: str
    agent_metadata: bytes
    mem_type: str  # "DRAM" or "VRAM"
    device: int
    base_addr: int
    num_pages: int
    page_nbytes: int


_pool_decoder = msgspec.msgpack.Decoder(NixlPool)
_pool_encoder = msgspec.msgpack.Encoder()


def encode_pool(pool: NixlPool) -> bytes:
    return _pool_encoder.encode(pool)


def decode_pool(data: bytes) -> NixlPool:
    """Raises msgspec.MsgspecError on garbage."""
    return _pool_decoder.decode(data)


def read_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the runs where both id lists count up by one:
    one NIXL descriptor pair per run."""
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return [(int(src[i]), int(dst[i]), int(n)) for i, n in zip(starts, lengths, strict=True)]


class NixlAgent:
    """One NIXL agent with the UCX backend and the pool `pages` (uint8 [num_pages, page_nbytes])
    registered. Reads go from a peer's pool into ours, each with a notification to the peer."""

    def __init__(self, pages: torch.Tensor) -> None:
        api = _api()
        self.name = f"pdserve-{uuid.uuid4().hex[:16]}"
        # No progress thread: it spins a third of a core per idle worker. Our loop progresses
        # NIXL when it checks reads and notifications, which it does while any are pending.
        config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = api.nixl_agent(self.name, config)
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL has no UCX backend plugin here")
        self._pages = pages
        self.page_nbytes = int(pages.shape[1])
        self.mem_type = "VRAM" if pages.is_cuda else "DRAM"
        self.device = (pages.device.index or 0) if pages.is_cuda else 0
        self._registered = self._agent.register_memory(pages)
        self._peers: dict[str, str] = {}  # our key for a peer -> its agent name

    def pool_info(self) -> NixlPool:
        metadata = self._agent.get_agent_metadata()
        return NixlPool(
            agent_name=self.name,
            agent_metadata=metadata,
            mem_type=self.mem_type,
            device=self.device,
            base_addr=self._pages.data_ptr(),
            num_pages=int(self._pages.shape[0]),
            page_nbytes=self.page_nbytes,
        )

    def add_peer(self, key: str, pool: NixlPool) -> None:
        """Load the peer's metadata (replacing what `key` had): we may then read its pool.
        Raises ValueError if the metadata is not the agent it claims to be."""
        self.remove_peer(key)
        name = self._agent.add_remote_agent(pool.agent_metadata)
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if name != pool.agent_name:
            self._agent.remove_remote_agent(name)
            raise ValueError(f"NIXL metadata of agent {name!r} sent as {pool.agent_name!r}")
        self._peers[key] = name

    def remove_peer(self, key: str) -> None:
        name = self._peers.pop(key, None)
        if name is not None and name not in self._peers.values():
            try:
                self._agent.remove_remote_agent(name)
            except Exception as exc:  # a half-loaded peer must not take the worker down
                log.debug("removing NIXL agent %s: %s", name, exc)

    def read(self, key: str, peer: NixlPool, src: np.ndarray, dst: np.ndarray, notif: bytes):
        """Start reading the peer's pages `src` into our pages `dst` (checked by the caller);
        the peer is notified with `notif` once the bytes are here. Returns the handle."""
        local, remote = [], []
        for s, d, n in read_runs(src, dst):
            nbytes = n * self.page_nbytes
            local.append((self._pages.data_ptr() + d * self.page_nbytes, nbytes, self.device))
            remote.append((peer.base_addr + s * self.page_nbytes, nbytes, peer.device))
        handle = self._agent.initialize_xfer(
            "READ",
            self._agent.get_xfer_descs(local, self.mem_type),
            self._agent.get_xfer_descs(remote, peer.mem_type),
            self._peers[key],
            notif,
        )
        if self._agent.transfer(handle) == "ERR":
            self.release(handle)
            raise RuntimeError("NIXL could not post the read")
        return handle

    def state(self, handle) -> str:
        """ "DONE", "PROC" or "ERR". A transfer whose peer died is "ERR": NIXL raises for
        it (NIXL_ERR_REMOTE_DISCONNECT), which would end the worker's loop; nothing of a
        dead peer's can still land."""
        try:
            return self._agent.check_xfer_state(handle)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            log.warning("NIXL transfer ended in error: %s", exc)
            return "ERR"

    def release(self, handle) -> bool:
        """Free the handle, cancelling the transfer if it is still under way; False if NIXL
        could neither finish nor cancel it (its target pages must then never be reused)."""
        try:
            self._agent.release_xfer_handle(handle)
            return True
        except Exception as exc:
            log.error("NIXL could not release a transfer: %s", exc)
            return False

    def notify(self, key: str, msg: bytes) -> None:
        self._agent.send_notif(self._peers[key], msg)

    def notifications(self) -> dict[str, list[bytes]]:
        """New notifications by sender agent name."""
        new = self._agent.get_new_notifs()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in new.items()}

    def close(self) -> None:
        for key in list(self._peers):
            self.remove_peer(key)
        try:
            self._agent.deregister_memory(self._registered)
        except Exception as exc:
            log.debug("deregistering the KV pool from NIXL: %s", exc)
