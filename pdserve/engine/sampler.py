"""Token sampling and logprobs for one step's logits; runs in each worker.

Randomness for output token i of a request comes from (seed, i) alone: a generator seeded
with a mix of the two draws the exponential noise of a race (argmax of p / E, E ~ Exp(1),
picks a token with probability p). So a seeded request yields the same tokens whatever else
is in the batch, and whichever process samples token i (PD: prefill samples token 0), on
the same kind of device: CUDA's generator draws other numbers than the CPU's for one seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pdserve.engine.host_copy import host_to_device
from pdserve.engine.logit_bias import add_logit_bias
from pdserve.engine.penalties import PenaltySpec, penalize, penalty_spec
from pdserve.engine.request import Request

_MASK64 = (1 << 64) - 1
# A temperature this small is greedy (SGLang's threshold too): logits divided by a smaller
# one overflow float32 to inf, softmax gives NaN and argmax picks token 0 every time.
GREEDY_BELOW_TEMPERATURE = 1e-6


def token_seed(seed: int, token_index: int) -> int:
    """A well-mixed 63-bit seed for (request seed, output token index) (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + token_index * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass(frozen=True)
class SampleSpec:
    """How to pick one row's token."""

    temperature: float
    top_k: int | None  # None: no top-k
    top_p: float
    min_p: float
    seed: int
    token_index: int  # index of the token being sampled in the request's output
    penalty: PenaltySpec | None = None  # None: no penalties, no min_new_tokens
    logit_bias: Mapping[int, float] | None = None  # None: no bias (the request's own map)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


def sample_spec(req: Request, eos_token_ids: frozenset[int], num_ahead: int = 0) -> SampleSpec:
    """How to sample the request's next token when `num_ahead` of its earlier tokens are
    still in flight (sampled on the device, not yet in `output_ids`)."""
    p = req.sampling
    return SampleSpec(
        temperature=p.temperature,
        top_k=p.top_k if p.top_k > 0 else None,
        top_p=p.top_p,
        min_p=p.min_p,
        seed=req.sampling_seed,
        token_index=len(req.output_ids) + num_ahead,
        penalty=penalty_spec(req, num_ahead, eos_token_ids),
        logit_bias=p.logit_bias or None,
    )


# Top-k/top-p look at this many most likely tokens first; a row whose nucleus reaches
# past them (a very flat distribution) falls back to sorting its whole vocabulary.
_CANDIDATES = 256


def _rank_filter(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """values: each row's probabilities sorted descending; zero those past top-k or the
    top-p nucleus (a token is dropped once the mass before it exceeds top_p)."""
    rank = torch.arange(values.shape[-1], device=values.device)
    mass_before = values.cumsum(dim=-1) - values
    drop = (rank[None, :] >= top_k[:, None]) | (mass_before > top_p[:, None])
    return values.masked_fill(drop, 0.0)


def filter_probs(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k, top-p nucleus and min-p floor.
    All three are judged on the unfiltered distribution; the most likely token always stays.
    top_k/top_p/min_p: [R] (top_k = vocab size to disable)."""
    vocab_size = probs.shape[-1]
    # min_p drops only the least likely tokens, so it never changes the mass before a
    # kept token: applying it first leaves top-p's judgement unchanged.
    floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    probs = probs.masked_fill(probs < floor, 0.0)
    limited = (top_k < vocab_size) | (top_p < 1)
    if not bool(limited.any()):
        return probs
    finite_k = top_k[top_k < vocab_size]
    num_candidates = min(vocab_size, max(_CANDIDATES, int(finite_k.max()) if len(finite_k) else 0))
    values, order = probs.topk(num_candidates, dim=-1)
    kept = torch.zeros_like(probs).scatter_(-1, order, _rank_filter(values, top_k, top_p))
    out = torch.where(limited[:, None], kept, probs)
    beyond = limited & (top_k > num_candidates) & (values.sum(dim=-1) <= top_p)
    if bool(beyond.any()):
        rows = beyond.nonzero().flatten()
        values, order = probs[rows].sort(dim=-1, descending=True)
        full = _rank_filter(values, top_k[rows], top_p[rows])
        out[rows] = torch.zeros_like(values).scatter_(-1, order, full)
    return out


def _exponential_noise(
    specs: list[SampleSpec], vocab_size: int, device: torch.device
) -> torch.Tensor:
    rows = []
    for spec in specs:
        gen = torch.Generator(device=device)
        gen.manual_seed(token_seed(spec.seed, spec.token_index))
        rows.append(torch.empty(vocab_size, device=device).exponential_(generator=gen))
    return torch.stack(rows)


def _sample_random(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    device = logits.device
    vocab_size = logits.shape[-1]
    temperature = host_to_device([s.temperature for s in specs], device, torch.float32)
    # A positive logit over a tiny repetition_penalty (then the temperature) overflows to
    # +inf, and softmax gave the row NaN, which argmax reads as token 0 every time: clamped
    # to the largest float, the overflowed tokens share the row's mass.
    scaled = (logits / temperature[:, None]).clamp(max=torch.finfo(logits.dtype).max)
    probs = torch.softmax(scaled, dim=-1)
    if any(s.top_k is not None or s.top_p < 1 or s.min_p > 0 for s in specs):
        top_k = torch.tensor([s.top_k or vocab_size for s in specs], device=device)
        top_p = torch.tensor([s.top_p for s in specs], device=device)
        min_p = torch.tensor([s.min_p for s in specs], device=device)
        probs = filter_probs(probs, top_k, top_p, min_p)
    return (probs / _exponential_noise(specs, vocab_size, device)).argmax(dim=-1)


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """One token id per row of float32 logits [R, vocab]."""
    return sample_on_device(logits, specs).tolist()


# In inference mode on every path, as a launched decode step samples: a penalized request's
# device ids (PenaltyIds) grown there are inference tensors, and a later step that samples
# after run() (a logprobs row in the batch, a recomputed prefill) failed to append to them.
@torch.inference_mode()
def sample_on_device(
    logits: torch.Tensor, specs: list[SampleSpec], ahead_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 token ids [R], left on the logits' device. Greedy and temperature-only rows
    queue their work without waiting for the device; top-k/top-p rows wait for it (their
    filter looks at the probabilities on the host). logit_bias, then penalties and
    min_new_tokens correct the logits first (vLLM's order), greedy rows' too; `ahead_ids`
    [R]: each row's newest output token when it is still on the device (overlap), needed
    by penalized rows with num_ahead."""
    logits = add_logit_bias(logits, [s.logit_bias for s in specs])
    logits = penalize(logits, [s.penalty for s in specs], ahead_ids)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, s in enumerate(specs) if not s.greedy]
    if random_rows:
        index = host_to_device(random_rows, logits.device)
        picked = _sample_random(logits[index], [specs[i] for i in random_rows])
        tokens[index] = picked
    return tokens


def logprobs_of(
    logits: torch.Tensor, token_ids: list[int], top_ns: list[int]
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log_softmax of the raw logits (SGLang semantics, before logit_bias, penalties,
    temperature or filters):
    each row's logprob of `token_ids[row]` and its top `top_ns[row]` (id, logprob) pairs."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_ids = torch.tensor(token_ids, device=logits.device)[:, None]
    chosen = logprobs.gather(-1, chosen_ids).squeeze(-1).tolist()
    max_n = min(max(top_ns, default=0), logits.shape[-1])
    if max_n <= 0:
        return chosen, [[] for _ in token_ids]
    values, ids = logprobs.topk(max_n, dim=-1)
    tops = [
        list(zip(row_ids[:n], row_vals[:n], strict=True))
        for row_ids, row_vals, n in zip(ids.tolist(), values.tolist(), top_ns, strict=True)
    ]
    return chosen, tops
