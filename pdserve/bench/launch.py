"""`pdserve bench --launch CMD`: start the setup under test, wait until it serves, and stop
it afterwards, so one command measures one setup. Runs in the benchmark client process;
the launched command runs in its own process group, which is what gets stopped.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator

from pdserve import procs
from pdserve.auth import bearer_header

# every path must answer 200; a router's /readiness (pdserve, sglang-router) waits for its
# workers, and servers without that route answer 404, which counts as ready
READY_PATHS = ("/health", "/readiness", "/model_info")
OPTIONAL_PATHS = frozenset({"/readiness"})
POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 4000


def wait_ready(
    proc: subprocess.Popen,
    base_url: str,
    timeout_s: float,
    log_path: str,
    api_key: str | None = None,
) -> None:
    """Poll every READY_PATHS until each answers 200 (404 for an optional one); RuntimeError
    with the log's tail when the process exits first or the deadline passes."""
    try:
        procs.wait_ready(
            [base_url + path for path in READY_PATHS],
            [proc],
            timeout_s,
            optional={base_url + path for path in OPTIONAL_PATHS},
            interval_s=POLL_INTERVAL_S,
            status_timeout_s=STATUS_TIMEOUT_S,
            headers=bearer_header(api_key),
        )
    except procs.ProcessExited as exc:
        raise RuntimeError(
            f"launched command {exc}:\n{procs.log_tail(log_path, LOG_TAIL_CHARS)}"
        ) from None
    except procs.NotReady as exc:
        raise RuntimeError(f"{exc}:\n{procs.log_tail(log_path, LOG_TAIL_CHARS)}") from None


@contextlib.contextmanager
def launched(
    command: str | None, base_url: str, timeout_s: float, api_key: str | None = None
) -> Iterator[None]:
    """Run `command` (a shell-style string, no shell; a leading `pdserve` means this Python's
    `-m pdserve`) for the duration of the block, its output in a log file; nothing happens
    when `command` is None."""
    if command is None:
        yield
        return
    _refuse_a_taken_port(base_url)
    log = tempfile.NamedTemporaryFile(prefix="pdserve-bench-launch-", suffix=".log", delete=False)
    print(f"launching: {command} (log: {log.name})", file=sys.stderr)
    argv = shlex.split(command)
    if argv and argv[0] == "pdserve":  # this Python's pdserve, installed or not
        argv = [sys.executable, "-m", "pdserve", *argv[1:]]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    with _exit_on_sigterm():
        try:
            wait_ready(proc, base_url.rstrip("/"), timeout_s, log.name, api_key)
            yield
        finally:
            procs.stop_group(proc, STOP_TIMEOUT_S)
            log.close()


def _refuse_a_taken_port(base_url: str) -> None:
    """A process already listening at the base URL would answer the readiness checks and
    the benchmark, and the launched setup (failing to bind) would never be measured."""
    url = urllib.parse.urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    if url.hostname in ("127.0.0.1", "localhost", "::1") and not procs.port_is_free(
        url.hostname, port
    ):
        raise RuntimeError(
            f"port {port} of {base_url} is already in use: --launch would measure whatever "
            "listens there, not the launched setup; stop it or pick another port"
        )


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the block, so that a benchmark stopped by a
    supervisor still stops what it launched (the default handler skips `finally`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
