"""`pdserve serve`: one server (front end + DP workers) in colocated, prefill or decode mode."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pdserve.serving.config import add_server_arguments

    parser = subparsers.add_parser(
        "serve",
        help="run one server: HTTP front end + --dp-size worker processes",
        description="Run one pdserve server. Flags follow SGLang's names.",
    )
    add_server_arguments(parser)
    parser.set_defaults(func=_run)


def _run(ns: argparse.Namespace) -> int:
    from pdserve.serving.config import server_config_from_args
    from pdserve.serving.http_server import serve

    try:
        cfg = server_config_from_args(ns)
    except ValueError as exc:
        raise SystemExit(f"pdserve serve: {exc}") from None
    return serve(cfg)
