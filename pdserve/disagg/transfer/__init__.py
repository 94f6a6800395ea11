"""KV transfer backends (worker processes): `make_transport` picks one by name."""

from __future__ import annotations

import torch

from pdserve.disagg.transfer.base import (
    Event,
    Inbound,
    KVReceived,
    KVTransport,
    PeerId,
    PeerLost,
    PeerUnreachable,
    SendHandle,
    TransportError,
    TransportOptions,
)

__all__ = [
    "Event",
    "Inbound",
    "KVReceived",
    "KVTransport",
    "PeerId",
    "PeerLost",
    "PeerUnreachable",
    "SendHandle",
    "TransportError",
    "TransportOptions",
    "make_transport",
]


def make_transport(
    name: str,
    pool: torch.Tensor,
    listen_host: str | None,
    *,
    advertise_host: str | None = None,
    options: TransportOptions | None = None,
) -> KVTransport:
    """`name` is DisaggConfig.transfer_backend: "zmq" (moves bytes), "fake" (control only),
    "cuda_ipc" (CUDA pools, GPU to GPU on one host) or "nixl" (NIXL over UCX, needs the
    optional NIXL package); or "fake_lane" (control only, on cuda_ipc's control lane: tests
    and benches of that path without GPUs).

    `advertise_host` replaces `listen_host` in `endpoint` (needed when listening on 0.0.0.0)."""
    # Imported here so that importing the interface does not start pulling in backends.
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcTransport
    from pdserve.disagg.transfer.fake_backend import FakeLaneTransport, FakeTransport
    from pdserve.disagg.transfer.zmq.transport import ZmqTransport

    backends: dict[str, type[ZmqTransport]] = {
        "zmq": ZmqTransport,
        "fake": FakeTransport,
        "fake_lane": FakeLaneTransport,
        "cuda_ipc": CudaIpcTransport,  # imports Triton only when it first copies
    }
    if name == "nixl":
        from pdserve.disagg.transfer.nixl_agent import nixl_missing

        missing = nixl_missing()
        if missing is not None:
            raise ValueError(missing)
        from pdserve.disagg.transfer.nixl_ucx import NixlTransport

        backends["nixl"] = NixlTransport
    if name not in backends:
        raise ValueError(f"unknown KV transfer backend {name!r}; choose from {sorted(backends)}")
    return backends[name](
        pool, listen_host=listen_host, advertise_host=advertise_host, options=options
    )
