"""Two network namespaces joined by a veth pair (10.213.0.1 <-> 10.213.0.2), made by a test
and removed in a finally; code runs inside one through `ip netns exec` (processes) or a
thread that joined it (`call_in`). Needs root and `ip`; `unavailable()` says why not."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
ADDRESS = {"a": "10.213.0.1", "b": "10.213.0.2"}
_CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "iproute2 (ip, ss) is not installed"
    probe = f"pdprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns add is not allowed: {getattr(exc, 'stderr', b'') or exc}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def namespace_pair() -> Iterator[dict[str, str]]:
    """{"a": name, "b": name}: two fresh namespaces, lo up, the veth addressed and up."""
    tag = f"{os.getpid()}"
    names = {side: f"pdtest-{tag}-{side}" for side in ADDRESS}
    try:
        for name in names.values():
            _ip("netns", "add", name)
        veth = {side: f"pdv{tag}{side}"[-15:] for side in ADDRESS}
        _ip("link", "add", veth["a"], "netns", names["a"], "type", "veth",
            "peer", "name", veth["b"], "netns", names["b"])  # fmt: skip
        for side, name in names.items():
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{ADDRESS[side]}/24", "dev", veth[side])
            _ip("-n", name, "link", "set", veth[side], "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def exec_argv(namespace: str) -> list[str]:
    return ["ip", "netns", "exec", namespace]


def call_in(namespace: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that joined `namespace` (a thread's network namespace is its own)."""
    result: dict[str, object] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def sockets(namespace: str, *states: str) -> list[tuple[str, str]]:
    """(local, peer) address:port pairs of TCP sockets in `namespace` (`ss` state filter)."""
    argv = [*exec_argv(namespace), "ss", "-Htn", *(["state", *states] if states else [])]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout
    pairs = []
    for line in out.splitlines():
        fields = line.split()
        pairs.append((fields[-2], fields[-1]))
    return pairs
