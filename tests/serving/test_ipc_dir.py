"""The front end's private socket directory: a server killed with SIGKILL cannot remove its
own, so the next server started under the same temp root removes it (its owner lock is
free); a live server's directory, and a `pdserve-*` directory with no lock, stay. Before,
every SIGKILLed server left a `/tmp/pdserve-*` directory for good. Real server processes."""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
from pathlib import Path

import pytest

from pdserve.serving.ipc_dir import LOCK_NAME, IpcDir, remove_stale
from tests.conftest import TINY_ARGS
from tests.helpers import launch_server, wait_until


def _ipc_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("pdserve-") and p.is_dir())


def _lock_free(path: Path) -> bool:
    fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock if taken


@pytest.fixture
def short_tmp():
    """A temp root short enough for the fork server's socket path (pytest's tmp_path under
    xdist is not: the server then spawns its workers, with no socket directory for them)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pdt-") as root:
        yield Path(root)


def test_a_sigkilled_servers_socket_dir_is_removed_by_the_next_server(short_tmp):
    tmp_path = short_tmp
    env = {"TMPDIR": str(tmp_path)}
    foreign = tmp_path / "pdserve-not-a-server"  # no owner lock: never touched
    foreign.mkdir()
    first = launch_server([*TINY_ARGS, "--dp-size", "2"], env=env)
    try:
        # the workers' links, and the fork server's socket
        stale = [p for p in _ipc_dirs(tmp_path) if p != foreign]
        assert len(stale) == 2, stale
        assert not any(_lock_free(p) for p in stale)  # held by the live server
        first.signal_group(signal.SIGKILL)
        first.proc.wait(30)
        wait_until(
            lambda: all(_lock_free(p) for p in stale), 30, "the killed server's workers to exit"
        )
    finally:
        first.stop()
    assert all(p.exists() for p in stale)  # nobody could remove them on the way out
    with launch_server([*TINY_ARGS], env=env):
        assert not any(p.exists() for p in stale)
        live = [p for p in _ipc_dirs(tmp_path) if p != foreign]
        assert len(live) == 2, live
        assert remove_stale(str(tmp_path)) == []  # a live server's directories stay
        assert all(p.exists() for p in live)
    assert _ipc_dirs(tmp_path) == [foreign]  # a stopped server removed its own


def test_an_ipc_dir_is_private_and_removed_on_close(tmp_path):
    ipc = IpcDir(str(tmp_path))
    assert os.stat(ipc.path).st_mode & 0o777 == 0o700
    assert remove_stale(str(tmp_path)) == []
    ipc.close()
    assert _ipc_dirs(tmp_path) == []
