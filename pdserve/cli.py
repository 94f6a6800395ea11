"""The `pdserve` command: one subcommand per role; each role's package owns its parser.

Each module named below exposes `add_parser(subparsers)`, which registers its subcommand
and sets `func` (called with the parsed namespace). Heavy imports stay inside `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdserve.config import ArgumentParser

SUBCOMMAND_MODULES = [
    "pdserve.serve",  # serve
    "pdserve.router.cli",  # router
    "pdserve.cluster",  # up
    "pdserve.bench.cli",  # bench
    "pdserve.bench.engine_bench",  # bench-engine
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pdserve",
        description="An LLM server with prefill-decode disaggregation and data parallelism: "
        "one subcommand per role (`pdserve SUBCOMMAND --help` lists its options).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    from pdserve.envs import EnvError

    try:
        parser = build_parser()  # imports the config modules, whose defaults read the env
    except EnvError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)
