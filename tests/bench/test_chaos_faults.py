"""The chaos soak's fault injector against a real process (a stub server): what a fault
record says of a restart."""

from __future__ import annotations

import random
import threading

from pdserve.bench.chaos_cluster import Node
from pdserve.bench.chaos_core import Fault
from pdserve.bench.chaos_faults import Injector
from tests.helpers import PYTHON, free_port


def test_a_restart_reports_its_stop_and_no_pause():
    """A SIGTERM now drains the server before it exits, so a restart's stop takes longer:
    the record says how long and whether it exited cleanly, and its pause is 0 (it is
    started again at once; the report showed the pause drawn, as if down that long)."""
    port = free_port()
    argv = [PYTHON, "-m", "tests.router.stub_worker", "--port", str(port), "--name", "p1"]
    node = Node("p1", "prefill", argv, f"http://127.0.0.1:{port}", ["/health"])
    load_over = threading.Event()
    load_over.set()  # no load: nothing to wait for after the restart
    injector = Injector({"p1": node}, random.Random(0), lambda: 0.0, 30.0, 1.0, load_over)
    node.start()
    try:
        node.wait_ready(30)
        record = injector.apply(Fault("restart_server", "p1", 2.5))
        assert record.pause_s == 0.0, record
        assert record.note.startswith("drained and exited in "), record
        assert node.alive() and record.ready_s is not None
    finally:
        node.stop()
