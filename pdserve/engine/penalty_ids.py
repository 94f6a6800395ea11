"""A penalized request's token ids kept on the device, so that a step uploads only the
output ids added since the previous one. Runs in each worker; kept on the `Request`
(`penalty_ids`), so it is freed with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.host_copy import host_to_device

_MIN_CAPACITY = 64  # output ids; the buffer doubles past it (amortised O(1) per token)


class PenaltyIds:
    """The request's prompt ids (only when its repetition penalty reads them) and output
    ids on one device. The host's lists are the truth: `sync` appends what they gained
    and rebuilds from scratch when they no longer extend what was uploaded (a rewind)."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.prompt_ids: torch.Tensor | None = None  # None: the prompt is not needed
        # [capacity]: its first num_output_ids entries are the uploaded output ids
        self._output_buffer: torch.Tensor | None = None
        self.num_output_ids = 0
        self._last_output_id: int | None = None  # the host's id at num_output_ids - 1
        self.num_uploaded_ids = 0  # host-to-device ids over its life, prompt included

    @property
    def output_ids(self) -> torch.Tensor:
        """int64 [num_output_ids] on the device (a view: valid until the next `sync`)."""
        assert self._output_buffer is not None, "sync() first"
        return self._output_buffer[: self.num_output_ids]

    def sync(
        self, device: torch.device, prompt_ids: Sequence[int] | None, output_ids: Sequence[int]
    ) -> None:
        """Bring the device copy up to the host's lists: `prompt_ids` None when the prompt
        is not needed. Host work is O(ids added since the last sync)."""
        wants_prompt = prompt_ids is not None
        if (
            self.device != device
            or wants_prompt != (self.prompt_ids is not None)
            or not self._extends_uploaded(output_ids)
        ):
            self._reset(device, prompt_ids)
        new_ids = list(output_ids[self.num_output_ids :])
        if new_ids:
            self._append(new_ids)
            self._last_output_id = new_ids[-1]

    def _extends_uploaded(self, output_ids: Sequence[int]) -> bool:
        # A rewind shows as a shorter list or, if it regrew since, as another id at the
        # last uploaded position (an O(1) check; the engine itself only ever appends).
        n = self.num_output_ids
        return len(output_ids) >= n and (n == 0 or output_ids[n - 1] == self._last_output_id)

    def _reset(self, device: torch.device, prompt_ids: Sequence[int] | None) -> None:
        self.device = device
        self.prompt_ids = None
        if prompt_ids is not None:
            self.prompt_ids = host_to_device(list(prompt_ids), device)
            self.num_uploaded_ids += len(prompt_ids)
        self._output_buffer = torch.empty(_MIN_CAPACITY, dtype=torch.int64, device=device)
        self.num_output_ids = 0
        self._last_output_id = None

    def _append(self, new_ids: list[int]) -> None:
        assert self._output_buffer is not None and self.device is not None
        start, end = self.num_output_ids, self.num_output_ids + len(new_ids)
        if end > len(self._output_buffer):
            grown = torch.empty(
                max(end, 2 * len(self._output_buffer)), dtype=torch.int64, device=self.device
            )
            grown[:start] = self._output_buffer[:start]
            self._output_buffer = grown
        self._output_buffer[start:end] = host_to_device(new_ids, self.device)
        self.num_output_ids = end
        self.num_uploaded_ids += len(new_ids)
