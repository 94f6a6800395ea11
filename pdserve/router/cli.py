"""`pdserve router`: the PD router's command line (runs in the router process)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from pdserve.config import add_arguments, from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pdserve.router.config import RouterConfig

    parser = subparsers.add_parser(
        "router",
        help="route requests to prefill + decode servers (or plain workers)",
        description="Picks one prefill and one decode server per request, adds the bootstrap "
        "fields, sends the same body to both and streams decode's answer back.",
    )
    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "--prefill",
        action="append",
        nargs="+",
        default=[],
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill server and, optionally, its bootstrap port "
        "(repeatable; 'none' or no port sends bootstrap_port null)",
    )
    workers.add_argument(
        "--decode", action="append", default=[], metavar="URL", help="a decode server (repeatable)"
    )
    workers.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL",
        help="plain mode: a colocated server (repeatable; no PD fields added)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="least severe log messages shown: warning shows failed attempts and workers "
        "going unhealthy; info adds requests refused by a worker (4xx) (default: warning)",
    )
    add_arguments(parser, RouterConfig)
    parser.set_defaults(func=run)


def worker_specs(ns: argparse.Namespace) -> tuple:
    from pdserve.router.config import WorkerSpec

    specs = [WorkerSpec(item[0], "prefill", _bootstrap_port(item)) for item in ns.prefill]
    specs += [WorkerSpec(url, "decode") for url in ns.decode]
    specs += [WorkerSpec(url, "regular") for url in ns.worker]
    return tuple(specs)


def _bootstrap_port(item: list[str]) -> int | None:
    if len(item) > 2:
        raise SystemExit(f"pdserve router: --prefill takes URL [BOOTSTRAP_PORT], got {item}")
    if len(item) == 1 or item[1].lower() == "none":
        return None
    try:
        return int(item[1])
    except ValueError:
        raise SystemExit(
            f"pdserve router: --prefill {item[0]}: bootstrap port must be an integer or "
            f"'none', got {item[1]!r}"
        ) from None


def run(ns: argparse.Namespace) -> int:
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import serve

    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s router %(levelname)s %(message)s"
    )
    try:
        config = from_args(RouterConfig, ns, workers=worker_specs(ns))
    except ValueError as exc:
        raise SystemExit(f"pdserve router: {exc}") from exc
    if not config.workers:
        raise SystemExit(
            "pdserve router: give --prefill and --decode (or --worker); workers "
            "can also be added later with POST /workers"
        )
    run_loop = asyncio.run
    try:
        import uvloop

        run_loop = uvloop.run
    except ImportError:
        pass
    try:
        run_loop(serve(config))
    except OSError as exc:  # --port or --prometheus-port taken, or the host not ours
        raise SystemExit(f"pdserve router: failed to start: {exc}") from exc
    return 0
