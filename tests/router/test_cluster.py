"""`pdserve up`: starts router + prefill + decode, serves a chat request, and leaves no
process behind after SIGTERM; a child that dies early stops the rest with its error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from tests.helpers import PYTHON, REPO_ROOT, free_port, http_status, wait_until

pytestmark = pytest.mark.timeout(300)


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as "pid state cmdline"."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid_comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        fields = rest.split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {fields[0]} {pid_comm}")
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


class Up:
    def __init__(self, *args: str):
        self.log = tempfile.NamedTemporaryFile(prefix="pdserve-up-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "pdserve", "up", *args],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def child_pids(self) -> list[int]:
        return sorted({int(p) for p in re.findall(r"\(pid (\d+)\)", self.output())})

    def kill_everything(self) -> None:
        for pgid in [self.proc.pid, *self.child_pids()]:
            if group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)
        os.unlink(self.log.name)


def test_up_serves_chat_and_leaves_nothing_after_sigterm():
    port = free_port()
    up = Up("--model-path", "tiny-random", "--port", str(port), "--torch-threads", "1")
    try:
        wait_until(
            lambda: (
                http_status(f"http://127.0.0.1:{port}/readiness") == 200
                or up.proc.poll() is not None
            ),
            240,
            "pdserve up to be ready",
        )
        wait_until(lambda: "Ctrl-C stops everything" in up.output(), 10, "the banner")
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in up.output()
        resp = requests.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        children = up.child_pids()
        assert len(children) == 3
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
        assert [group_members(pid) for pid in children] == [[], [], []]
    finally:
        up.kill_everything()


def test_up_stops_everything_when_a_child_dies_early():
    up = Up("--model-path", "tiny-random", "--server-args", "--dp-size 0")
    try:
        assert up.proc.wait(120) == 1
        out = up.output()
        assert re.search(r"pdserve up: (prefill|decode) exited with code \d+", out), out
        assert "--dp-size must be >= 1" in out
        children = up.child_pids()
        assert len(children) == 3 and [group_members(pid) for pid in children] == [[], [], []]
    finally:
        up.kill_everything()
