"""logit_bias: per-request additions to chosen tokens' logits before any token is picked
(OpenAI's and vLLM's semantics). Runs in each worker, on the device that holds the logits.

Only biased rows pay: a step with none leaves the logits untouched, with no device work.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pdserve.engine.host_copy import host_to_device


def add_logit_bias(logits: torch.Tensor, biases: list[Mapping[int, float] | None]) -> torch.Tensor:
    """`logits` [R, vocab] plus each row's bias (None or empty: none): a new tensor when any
    row has one (the raw logits stay for logprobs), else `logits` itself. Token ids are
    within the vocabulary (checked when the request was admitted)."""
    rows: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for row, bias in enumerate(biases):
        if bias:
            rows.extend([row] * len(bias))
            token_ids.extend(bias.keys())
            values.extend(bias.values())
    if not rows:
        return logits
    device = logits.device
    index = (host_to_device(rows, device), host_to_device(token_ids, device))
    # accumulate: added to the logit (index_put alone would put the bias in its place)
    return logits.index_put(index, host_to_device(values, device, logits.dtype), accumulate=True)
