"""The front end's private directory for the Unix sockets to its workers, and the removal of
the directories that servers killed with SIGKILL left behind. Runs in the front end.

Each directory holds `owner.lock`, flocked by its front end for its whole life (the kernel
drops the lock when that process and every worker that inherited it are gone), so a lock
that can be taken marks a dead owner, whatever became of its pid."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

PREFIX = "pdserve-"
LOCK_NAME = "owner.lock"


class IpcDir:
    """A fresh directory only this user can enter (mkdtemp: mode 0700), locked until `close`.
    Creating one first removes the stale directories of dead owners under the same root."""

    def __init__(self, root: str | None = None) -> None:
        root = root or tempfile.gettempdir()
        remove_stale(root)
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=root)
        self._lock_fd: int | None = _hold_lock(self.path)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _hold_lock(path: str) -> int:
    """Lock under a name no cleaner reads, then rename into place: a cleaner never finds an
    `owner.lock` that is not locked yet."""
    fresh = os.path.join(path, LOCK_NAME + ".new")
    fd = os.open(fresh, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(fresh, os.path.join(path, LOCK_NAME))
    return fd


def remove_stale(root: str) -> list[str]:
    """Remove this user's `pdserve-*` directories under `root` whose owner lock is free; the
    paths removed. A directory without the lock file (another program's, or being made) or
    with its lock held is left alone."""
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            fd = os.open(
                os.path.join(entry.path, LOCK_NAME),
                os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
            )
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner lives
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
        logger.info("removed %s, left by a server that is gone", entry.path)
        removed.append(entry.path)
    return removed
