"""Decode steps launched one step ahead of their outputs (overlap scheduling). Worker process.

While the device runs step N the host schedules and launches step N+1; a request still in
step N decodes, in N+1, the token N samples for it, which stays on the device. Step N's
token ids reach the host one step late, through a non-blocking copy and an event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.host_copy import host_to_device
from pdserve.engine.request import Request


@dataclass(frozen=True)
class DecodeRow:
    """One request's row of a decode step: the KV of `position` is computed, the token at
    position + 1 sampled. `prev_row` set: the token at `position` is the one the previous
    launched step sampled in that row (not on the host yet), else it is `token_id`."""

    req: Request
    position: int
    token_id: int
    prev_row: int | None
    num_ahead: int  # 1 when the request's newest token is still in flight, else 0


def decode_rows(reqs: list[Request], previous: LaunchedDecode | None) -> list[DecodeRow]:
    prev_rows = {req: i for i, req in enumerate(previous.reqs)} if previous else {}
    rows = []
    for req in reqs:
        prev_row = prev_rows.get(req)
        if prev_row is None:
            position = req.seq_len - 1
            rows.append(DecodeRow(req, position, req.token_at(position), None, 0))
        else:
            rows.append(DecodeRow(req, req.seq_len, 0, prev_row, 1))
    return rows


def ahead_token_ids(
    rows: list[DecodeRow], previous: LaunchedDecode | None, device: torch.device
) -> torch.Tensor | None:
    """[len(rows)] on the device: each row's newest output token when the previous step
    sampled it (still in flight), else a placeholder 0; None when no row is ahead. Read on
    the device, so nothing waits for the previous step."""
    if previous is None or all(r.prev_row is None for r in rows):
        return None
    index = host_to_device([0 if r.prev_row is None else r.prev_row for r in rows], device)
    return previous.token_ids_device[index]


@dataclass
class LaunchedDecode:
    """A decode step queued on the device: its requests (row order) and sampled ids."""

    reqs: list[Request]
    token_ids_host: torch.Tensor  # pinned; valid once `ready` has completed
    ready: torch.cuda.Event | None  # None on the CPU, where the step has already run
    token_ids_device: torch.Tensor  # the sampled ids where they were sampled

    @classmethod
    def start(cls, reqs: list[Request], token_ids: torch.Tensor) -> LaunchedDecode:
        """Queue the copy of the step's sampled ids to the host, behind the step."""
        if token_ids.device.type != "cuda":
            return cls(reqs, token_ids, None, token_ids)
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(reqs, host, ready, token_ids)

    def token_ids(self) -> list[int]:
        """The sampled ids, row by row; waits for the step (and only it) to finish."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.token_ids_host.tolist()
