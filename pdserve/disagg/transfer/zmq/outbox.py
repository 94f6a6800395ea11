"""Outbound side of the ZeroMQ KV transport: per-peer queues, staging buffers, send handles.

Runs in worker processes. A KV frame stays a page plan until it reaches the head of its
peer's queue, so queued transfers cost no memory; only frames handed to ZeroMQ hold bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq

from pdserve.disagg.transfer.base import SendHandle
from pdserve.disagg.transfer.zmq.pages import FramePlan


class KVSend(SendHandle):
    """One send_kv: its messages (the final RoomStatus included) still queued, and ZeroMQ's
    hold on the ones it took, with the pool pages each of those reads in place."""

    def __init__(self, room: int, num_messages: int) -> None:
        self.room = room
        self.messages_left = num_messages
        self._in_flight: list[tuple[list[zmq.MessageTracker], list[int]]] = []
        self._error: str | None = None

    def sent(self, trackers: list[zmq.MessageTracker], page_ids: list[int]) -> None:
        """One message went to ZeroMQ (or a data connection); `trackers` say when it lets
        go of each part, `page_ids` the pool pages those parts point into."""
        self.messages_left -= 1
        if trackers:
            self._in_flight.append((trackers, page_ids))

    def fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason

    def in_flight(self) -> list[tuple[list[zmq.MessageTracker], list[int]]]:
        """The messages ZeroMQ has not let go of yet, with the pages they point into."""
        self._in_flight = [(ts, ids) for ts, ids in self._in_flight if not all(t.done for t in ts)]
        return self._in_flight

    def done(self) -> bool:
        # Zero-copy frames point into the pool: the pages stay busy until ZeroMQ lets go.
        return (self.messages_left == 0 or self._error is not None) and not self.in_flight()

    @property
    def error(self) -> str | None:
        return self._error


class Staging:
    """Frame-sized buffers for gathering scattered pages, reused once ZeroMQ has sent them."""

    def __init__(self, max_buffers: int, pages_per_frame: int, page_nbytes: int) -> None:
        self._max_buffers = max_buffers
        self._shape = (pages_per_frame, page_nbytes)
        self._buffers: list[torch.Tensor] = []
        self._trackers: list[zmq.MessageTracker | None] = []

    def acquire(self) -> int | None:
        """Index of a free buffer (allocating up to the limit), or None if all are in use."""
        for i, tracker in enumerate(self._trackers):
            if tracker is None or tracker.done:
                self._trackers[i] = None
                return i
        if len(self._buffers) == self._max_buffers:
            return None
        # zeros, not empty: touch the memory now rather than page-faulting on the hot path.
        self._buffers.append(torch.zeros(self._shape, dtype=torch.uint8))
        self._trackers.append(None)
        return len(self._buffers) - 1

    def buffer(self, index: int) -> torch.Tensor:
        return self._buffers[index]

    def hold(self, index: int, tracker: zmq.MessageTracker | None) -> None:
        """The buffer is busy until `tracker` is done (None: free now)."""
        self._trackers[index] = tracker


@dataclass
class Outgoing:
    """One queued message: ready `parts`, or a KV frame to build when its turn comes."""

    parts: list[Any] | None = None
    plan: FramePlan | None = None
    handle: KVSend | None = None
    staging_index: int | None = None


class Outbox:
    """Per-peer FIFO queues: a peer's messages leave in the order they were sent."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Outgoing]] = {}

    def push(self, peer: str, items: list[Outgoing]) -> int:
        """Append `items` to the peer's queue; returns its new length."""
        queue = self.queues.setdefault(peer, deque())
        queue.extend(items)
        return len(queue)

    def drop_peer(self, peer: str, reason: str, staging: Staging) -> None:
        """Abandon everything queued for `peer`: handles fail, staging buffers come back."""
        for item in self.queues.pop(peer, ()):
            if item.handle is not None:
                item.handle.fail(reason)
            if item.staging_index is not None:
                staging.hold(item.staging_index, None)

    def drop_room(self, room: int, staging: Staging) -> None:
        """Drop the room's messages still queued (each is a whole ZeroMQ message, so the
        peer's stream stays intact); their staging buffers come back."""
        for peer, queue in self.queues.items():
            mine = [i.handle is not None and i.handle.room == room for i in queue]
            for item in (i for i, m in zip(queue, mine, strict=True) if m):
                if item.staging_index is not None:
                    staging.hold(item.staging_index, None)
            if any(mine):
                self.queues[peer] = deque(i for i, m in zip(queue, mine, strict=True) if not m)

    def pending(self) -> bool:
        return any(self.queues.values())


def gather(pages: torch.Tensor, src: np.ndarray, out: torch.Tensor) -> np.ndarray:
    """Copy pool pages `src` into `out` (one index_select, no per-page loop); returns a view."""
    view = out[: src.size]
    torch.index_select(pages, 0, torch.from_numpy(src), out=view)
    return view.numpy()
