"""Build-once model directories under the cache dir, safe when processes race (worker).

A builder writes into a private temporary directory that is then renamed into place: a
reader never sees a half-written model. A lock file keeps concurrent processes from
doing the same slow build twice; if the lock is not had in time, building anyway is still
correct because only one rename wins.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from pdserve import envs

LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.2


def cached_model_dir(name: str, build: Callable[[str], None]) -> str:
    """The path of cache entry `name`; `build(tmp_dir)` fills it on first use."""
    root = envs.model_cache_dir()
    final = os.path.join(root, name)
    if _complete(final):
        return final
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "w") as lock_file:
        _lock(lock_file.fileno(), LOCK_TIMEOUT_S)
        if not _complete(final):
            _build_and_publish(root, final, name, build)
    return final


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _lock(fd: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_LOCK_POLL_S)


def _build_and_publish(root: str, final: str, name: str, build: Callable[[str], None]) -> None:
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
