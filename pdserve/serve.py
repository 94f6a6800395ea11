"""`pdserve serve`: one server (front end + DP workers) in colocated, prefill or decode mode.

The one place where serving and disaggregation meet: it composes the server's config and
picks the hooks its mode runs. Runs in the server's front-end process.
"""

from __future__ import annotations

import argparse
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.serving.http_server import ServerHooks


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pdserve.disagg.config import add_pd_server_arguments

    parser = subparsers.add_parser(
        "serve",
        help="run one server: HTTP front end + --dp-size worker processes",
        description="Run one pdserve server. Flags follow SGLang's names.",
    )
    add_pd_server_arguments(parser)
    parser.set_defaults(func=_run)


def hooks_for(mode: str) -> ServerHooks:
    """Colocated servers run serving's no-op hooks; prefill and decode servers run the
    disaggregation hooks (the worker factory is pickled by name into each worker)."""
    from pdserve.serving.http_server import ServerHooks

    if mode == "colocated":
        return ServerHooks()
    from pdserve.disagg.frontend import make_frontend_hooks
    from pdserve.disagg.worker_side import make_worker_hooks

    return ServerHooks(frontend=make_frontend_hooks, worker=make_worker_hooks)


def _run(ns: argparse.Namespace) -> int:
    from pdserve.disagg.config import pd_server_config_from_args
    from pdserve.serving import launcher

    # Until the server's loop takes the signals over, SIGTERM stops the start as Ctrl-C
    # does: the fork server started below is stopped too, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            cfg = pd_server_config_from_args(ns)
            launcher.prestart()  # the workers' imports, while the front end imports its own
        except ValueError as exc:
            raise SystemExit(f"pdserve serve: {exc}") from None
        from pdserve.serving.http_server import serve

        return serve(cfg, hooks_for(cfg.server.mode))
    except KeyboardInterrupt:
        return 0
    finally:
        launcher.stop_helpers()
