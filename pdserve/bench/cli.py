"""`pdserve bench` (measure a server or router) and `pdserve bench compare A.json B.json`.

The options come from `BenchConfig`; heavy imports wait until the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from pdserve.config import add_arguments, from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pdserve.bench.config import BenchConfig

    parser = subparsers.add_parser(
        "bench",
        help="serving benchmark: TTFT, ITL, TPOT, throughput, goodput",
        description="Measure a server or router under load; `bench compare` reads results.",
    )
    add_arguments(parser, BenchConfig, "benchmark options")
    parser.set_defaults(func=run_bench)
    actions = parser.add_subparsers(dest="bench_action", metavar="{compare}")
    compare = actions.add_parser("compare", help="two or more result JSON files side by side")
    compare.add_argument("results", nargs="+", help="result JSON files (the first is the base)")
    compare.add_argument("--plot", default=None, help="write overlaid latency CDFs to this PNG")
    compare.add_argument(
        "--plot-bars",
        default=None,
        help="write bars of each run's TTFT p50/p99, cached-token share (and the oracle's, "
        "for multi-turn runs), output throughput and KV bytes on the wire to this PNG",
    )
    compare.set_defaults(func=run_compare)


def run_bench(args: argparse.Namespace) -> int:
    from pdserve.bench.config import BenchConfig
    from pdserve.bench.driver import main

    try:
        return main(from_args(BenchConfig, args))
    except (ValueError, RuntimeError, OSError) as exc:
        # a bad option, an unreachable server, a missing file: say so without a traceback
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2


def run_compare(args: argparse.Namespace) -> int:
    from pdserve.bench.compare import format_compare, load_run

    if len(args.results) < 2:
        raise SystemExit("pdserve bench compare: give at least two result files")
    try:
        runs = [load_run(path) for path in args.results]
    except (ValueError, OSError) as exc:  # a missing file, not JSON, not a result
        print(f"pdserve bench compare: error: {exc}", file=sys.stderr)
        return 2
    print(format_compare(runs))
    if args.plot:
        from pdserve.bench.plots import plot_compare

        plot_compare(runs, args.plot)
        print(f"plot written to {os.path.abspath(args.plot)}")
    if args.plot_bars:
        from pdserve.bench.compare import oracle_cached_share
        from pdserve.bench.plots import plot_compare_bars

        oracle = [oracle_cached_share(result) for _, result in runs]
        plot_compare_bars(runs, oracle, args.plot_bars)
        print(f"plot written to {os.path.abspath(args.plot_bars)}")
    return 0
