"""Control-only KV transports for control-flow tests: real messages, no KV bytes.

Runs where the zmq backend would. `send_kv` sends one KVHeader with no frames; the receiver
checks it against its grant like real KV and reports KVReceived with nbytes == 0. `fake`
sends on ZeroMQ; `fake_lane` on the cuda_ipc backend's one-host control lane, so that path
runs (and is measured) without GPUs.
"""

from __future__ import annotations

import numpy as np

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.lane_control import LaneControl
from pdserve.disagg.transfer.zmq.outbox import Outgoing
from pdserve.disagg.transfer.zmq.transport import ZmqTransport


class FakeTransport(ZmqTransport):
    name = "fake"
    moves_bytes = False

    def _kv_items(self, room: int, src: np.ndarray, dst: np.ndarray) -> list[Outgoing]:
        header = m.KVHeader(
            room=room, frame_page_counts=[], page_nbytes=self.page_nbytes, dst_page_ids=dst.tolist()
        )
        return [Outgoing(parts=[m.encode(header)])]


class FakeLaneTransport(LaneControl, FakeTransport):
    name = "fake_lane"
