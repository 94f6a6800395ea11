"""Frequency, presence and repetition penalties and min_new_tokens, applied to a step's
logits before any token is picked (vLLM's and SGLang's semantics). Runs in each worker.

Only rows of penalized requests pay: their token counts are built on the device per step
from ids kept there (`PenaltyIds`), to which a step uploads only the newest output ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.host_copy import host_to_device
from pdserve.engine.penalty_ids import PenaltyIds
from pdserve.engine.request import Request


@dataclass(frozen=True, eq=False)
class PenaltySpec:
    """What one penalized row's logits must be corrected by before sampling. The id lists
    are the request's own (not copies, which would cost O(length) a step): a spec is used
    in the step that builds it, before the request gains a token."""

    frequency: float
    presence: float
    repetition: float
    token_ids: PenaltyIds  # the request's ids on the device, brought up to date by penalize
    prompt_ids: Sequence[int] | None  # None unless the repetition penalty needs them
    output_ids: Sequence[int]  # those on the host
    num_ahead: int  # 1: the newest output token is still on the device (overlap)
    banned_ids: tuple[int, ...]  # EOS and stop ids while min_new_tokens is not reached


def penalty_spec(req: Request, num_ahead: int, eos_token_ids: frozenset[int]) -> PenaltySpec | None:
    """None for a request without penalties (its row runs as if none existed)."""
    p = req.sampling
    if not p.penalized:
        return None
    if req.penalty_ids is None:
        req.penalty_ids = PenaltyIds()
    banned: tuple[int, ...] = ()
    if len(req.output_ids) + num_ahead < p.min_new_tokens:
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        banned = tuple(sorted(stops))
    return PenaltySpec(
        frequency=p.frequency_penalty,
        presence=p.presence_penalty,
        repetition=p.repetition_penalty,
        token_ids=req.penalty_ids,
        prompt_ids=req.prompt_ids if p.repetition_penalty != 1 else None,
        output_ids=req.output_ids,
        num_ahead=num_ahead,
        banned_ids=banned,
    )


def penalize(
    logits: torch.Tensor, specs: list[PenaltySpec | None], ahead_ids: torch.Tensor | None
) -> torch.Tensor:
    """`logits` [R, vocab] with each penalized row corrected: a new tensor when any row is
    (the raw logits stay for logprobs), else `logits` itself. `ahead_ids` [R] on the device:
    each row's newest output token still in flight; read only for rows with num_ahead."""
    rows = [i for i, s in enumerate(specs) if s is not None]
    if not rows:
        return logits
    penalized = [s for s in specs if s is not None]
    device = logits.device
    for s in penalized:
        s.token_ids.sync(device, s.prompt_ids, s.output_ids)
    index = host_to_device(rows, device)
    ahead = [p for p, s in enumerate(penalized) if s.num_ahead]
    if ahead and ahead_ids is None:
        raise ValueError("a penalized row has a token in flight but no ahead_ids were given")
    ahead_tokens = ahead_ids[host_to_device([rows[p] for p in ahead], device)] if ahead else None
    counts = _output_counts(penalized, ahead, ahead_tokens, logits.shape[-1], device)
    picked = logits[index]
    if any(s.repetition != 1 for s in penalized):
        picked = _repetition(picked, counts, penalized)
    frequency = host_to_device([s.frequency for s in penalized], device, torch.float32)
    presence = host_to_device([s.presence for s in penalized], device, torch.float32)
    picked = picked - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    picked = _ban(picked, penalized)
    return logits.index_copy(0, index, picked.to(logits.dtype))


def _scatter_rows(target: torch.Tensor, row_ids: list[torch.Tensor | None]) -> None:
    """target[p, t] += 1 for each id t of row_ids[p] (repeats accumulate; None: no ids),
    in place, in one scatter over the rows' ids concatenated on the device."""
    rows = [p for p, ids in enumerate(row_ids) if ids is not None and len(ids)]
    if not rows:
        return
    id_tensors = [row_ids[p] for p in rows]
    lengths = [len(ids) for ids in id_tensors]
    device, total = target.device, sum(lengths)
    row_index = torch.repeat_interleave(
        host_to_device(rows, device), host_to_device(lengths, device), output_size=total
    )
    # index_add_ on the flat view: several times faster than index_put_(accumulate=True)
    # on the CPU, and exact on CUDA whatever the atomics' order (whole counts in float32).
    flat_index = row_index * target.shape[-1] + torch.cat(id_tensors)
    target.view(-1).index_add_(0, flat_index, target.new_ones(1).expand(total))


def _output_counts(
    specs: list[PenaltySpec],
    ahead: list[int],
    ahead_tokens: torch.Tensor | None,
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """float32 [P, vocab]: how often each token occurs in each row's output so far."""
    counts = torch.zeros(len(specs), vocab_size, device=device)
    _scatter_rows(counts, [s.token_ids.output_ids for s in specs])
    if ahead_tokens is not None:
        counts.index_put_(
            (host_to_device(ahead, device), ahead_tokens),
            counts.new_ones(1).expand(len(ahead)),
            accumulate=True,
        )
    return counts


def _repetition(
    logits: torch.Tensor, counts: torch.Tensor, specs: list[PenaltySpec]
) -> torch.Tensor:
    """A token seen in the prompt or the output: logit / r if positive, else logit * r."""
    seen = (counts > 0).float()
    _scatter_rows(seen, [s.token_ids.prompt_ids for s in specs])
    penalty = host_to_device([s.repetition for s in specs], logits.device, torch.float32)[:, None]
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen > 0, scaled, logits)


def _ban(logits: torch.Tensor, specs: list[PenaltySpec]) -> torch.Tensor:
    vocab_size = logits.shape[-1]
    pairs = [(p, t) for p, s in enumerate(specs) for t in s.banned_ids if 0 <= t < vocab_size]
    if not pairs:
        return logits
    rows = host_to_device([p for p, _ in pairs], logits.device)
    tokens = host_to_device([t for _, t in pairs], logits.device)
    return logits.index_put((rows, tokens), logits.new_tensor(float("-inf")))
