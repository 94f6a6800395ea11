"""Builds a worker's disaggregation hooks: the KV transport, and for prefill workers the
registration of their KV endpoint with the bootstrap server. Runs in each worker process;
`make_worker_hooks` is the factory `pdserve serve` hands to serving's workers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from pdserve import netaddr
from pdserve.disagg.bootstrap_client import bootstrap_url, register_worker_blocking
from pdserve.disagg.bootstrap_registry import WorkerRegistration
from pdserve.disagg.rank_resolver import registers_all_rooms

if TYPE_CHECKING:
    from pdserve.disagg.config import PDServerConfig
    from pdserve.disagg.transfer import TransportOptions
    from pdserve.engine.engine import Engine
    from pdserve.serving.hooks import WorkerHooks

log = logging.getLogger(__name__)


def advertised_host(cfg: PDServerConfig) -> str:
    """The host peers should use to reach this server's bootstrap server and KV endpoints;
    never loopback for a routable bind (see netaddr.py)."""
    return netaddr.advertised_host(
        cfg.server.host, cfg.disagg.bootstrap_host or cfg.server.advertise_host
    )


def make_worker_hooks(cfg: PDServerConfig, engine: Engine, dp_rank: int) -> WorkerHooks:
    # Imported here: the transfer backends import torch, which the front end (importing
    # this module for advertised_host) does not need.
    from pdserve.disagg.transfer import make_transport

    if cfg.server.mode == "prefill":
        from pdserve.disagg.prefill_worker import PrefillWorkerHooks

        transport = make_transport(
            cfg.disagg.transfer_backend,
            engine.kv_pool,
            listen_host=cfg.server.host,
            advertise_host=advertised_host(cfg),
            options=_options(cfg),
        )
        hooks = PrefillWorkerHooks(engine, cfg.disagg, transport, dp_rank, epoch=cfg.epoch)
        _register_in_background(cfg, engine, dp_rank, transport.endpoint)
        return hooks
    if cfg.server.mode == "decode":
        from pdserve.disagg.decode_worker import DecodeWorkerHooks

        transport = make_transport(
            cfg.disagg.transfer_backend, engine.kv_pool, listen_host=None, options=_options(cfg)
        )
        # Stable across restarts of this server (same machine and port), unique among
        # servers: prefill recognises a restart by it and drops the earlier epoch's rooms.
        decode_id = f"decode-{socket.gethostname()}:{cfg.server.port}-dp{dp_rank}"
        return DecodeWorkerHooks(engine, cfg.disagg, transport, decode_id, epoch=cfg.epoch)
    raise ValueError(f"no disaggregation hooks for mode {cfg.server.mode!r}")


def _options(cfg: PDServerConfig) -> TransportOptions:
    from pdserve.disagg.transfer import TransportOptions

    return TransportOptions(
        heartbeat_interval_s=cfg.disagg.heartbeat_interval_s,
        heartbeat_timeout_s=cfg.disagg.heartbeat_timeout_s,
        read_timeout_s=cfg.disagg.kv_wait_timeout_s,
    )


def registration(
    cfg: PDServerConfig, engine: Engine, dp_rank: int, endpoint: str
) -> WorkerRegistration:
    layout = engine.kv_layout()
    method = cfg.server.resolved_lb_method
    return WorkerRegistration(
        dp_rank=dp_rank,
        dp_size=cfg.server.dp_size,
        kv_endpoint=endpoint,
        page_size=layout.page_size,
        kv_dtype=layout.kv_dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        model_fingerprint=layout.model_fingerprint,
        load_balance_method=method,
        registers_all_rooms=registers_all_rooms(method, cfg.disagg.force_query_prefill_dp_rank),
        epoch=cfg.epoch,
    )


def _register_in_background(
    cfg: PDServerConfig, engine: Engine, dp_rank: int, endpoint: str
) -> None:
    """PUT /route from a thread: the front end may start its bootstrap server after this
    worker reports ready, so registration must not block the worker loop."""
    reg = registration(cfg, engine, dp_rank, endpoint)
    # Its own front end's bootstrap server: reached on this machine, whatever is advertised.
    url = bootstrap_url(netaddr.local_host(cfg.server.host), cfg.disagg.bootstrap_port)

    def run() -> None:
        try:
            register_worker_blocking(
                url, reg, cfg.server.worker_start_timeout_s, cfg.disagg.disagg_secret
            )
            log.info("prefill worker %d registered %s with %s", dp_rank, endpoint, url)
        except Exception:
            # Without registration decode can never find this worker: stop loudly.
            log.exception("prefill worker %d could not register; exiting", dp_rank)
            os._exit(3)

    threading.Thread(target=run, name=f"register-dp{dp_rank}", daemon=True).start()
