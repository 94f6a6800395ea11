"""Host values to a device tensor without a stream synchronisation, for the sampler,
penalties and overlap scheduling. Worker process; imports nothing of the engine.
"""

from __future__ import annotations

import torch


def host_to_device(
    values: list[int] | list[float], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """A tensor on `device` without waiting for the device's queued work (a blocking
    host-to-device copy synchronises the stream; a pinned non-blocking one is queued)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
