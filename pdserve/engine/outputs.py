"""Turns a step's logits into tokens, logprobs, stops and StepOutputs. Worker process.

Applies the results to the requests (computed positions, output ids, prompt logprobs);
the engine then moves each request on (finish, hold for KV transfer, keep decoding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.request import FinishReason, ReqState, Request, StepOutput
from pdserve.engine.runner import ItemRows
from pdserve.engine.sampler import logprobs_of, sample, sample_spec
from pdserve.engine.stops import check_finish


def _samples_now(req: Request) -> bool:
    # max_new_tokens == 0 scores the prompt only; a prefill_only request always produces
    # the first token, which the decode side needs.
    return req.sampling.max_new_tokens > 0 or req.prefill_only


class OutputBuilder:
    def __init__(
        self, eos_token_ids: frozenset[int], detokenize: Callable[[list[int]], str] | None
    ):
        self.eos_token_ids = eos_token_ids
        self.detokenize = detokenize

    def process(self, logits: torch.Tensor, items: list[ItemRows]) -> list[StepOutput]:
        for item in items:
            item.req.num_computed += item.num_tokens
            if item.prompt_rows:
                self._add_prompt_logprobs(item.req, logits[item.prompt_rows], item.prompt_positions)
        finals = [it for it in items if it.sample_row is not None]
        sampled = [it for it in finals if _samples_now(it.req)]
        rows = logits[[it.sample_row for it in sampled]]
        token_ids = (
            sample(rows, [sample_spec(it.req, self.eos_token_ids) for it in sampled])
            if sampled
            else []
        )
        tokens = {id(it.req): t for it, t in zip(sampled, token_ids, strict=True)}
        lp_items = [
            (it, t) for it, t in zip(sampled, token_ids, strict=True) if it.req.return_logprob
        ]
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if lp_items:
            lp_rows = logits[[it.sample_row for it, _ in lp_items]]
            top_ns = [it.req.top_logprobs_num for it, _ in lp_items]
            chosen, tops = logprobs_of(lp_rows, [t for _, t in lp_items], top_ns)
            for (it, _), lp, top in zip(lp_items, chosen, tops, strict=True):
                logprobs[id(it.req)] = (lp, top)
        return [
            self._emit(it.req, tokens.get(id(it.req)), logprobs.get(id(it.req))) for it in finals
        ]

    def process_decoded(self, decoded: list[tuple[Request, int]]) -> list[StepOutput]:
        """A decode step's sampled token per request, collected after the step (no logits:
        overlapped steps carry no logprobs)."""
        outputs = []
        for req, token_id in decoded:
            req.num_computed += 1
            outputs.append(self._emit(req, token_id, None))
        return outputs

    def _add_prompt_logprobs(self, req: Request, rows: torch.Tensor, positions: list[int]) -> None:
        next_ids = [req.prompt_ids[p + 1] for p in positions]
        chosen, tops = logprobs_of(rows, next_ids, [req.top_logprobs_num] * len(positions))
        if req.prompt_logprobs is None:
            req.prompt_logprobs, req.prompt_top_logprobs = [], []
        req.prompt_logprobs.extend(chosen)
        req.prompt_top_logprobs.extend(tops)

    def _emit(
        self,
        req: Request,
        token_id: int | None,
        logprob: tuple[float | None, list[tuple[int, float]] | None] | None,
    ) -> StepOutput:
        out = StepOutput(req.rid, cached_tokens=req.cached_tokens)
        if req.state is ReqState.PREFILLING:
            self._attach_prompt_logprobs(req, out)
        if token_id is None:
            out.finish_reason = FinishReason("length")
            return out
        req.output_ids.append(token_id)
        out.new_token_ids = [token_id]
        if req.return_logprob and logprob is not None and logprob[0] is not None:
            out.new_token_logprobs = [logprob[0]]
            if req.top_logprobs_num > 0:
                out.new_top_logprobs = [list(logprob[1] or [])]
        out.finish_reason = check_finish(req, self.eos_token_ids, self.detokenize)
        out.kv_ready = req.prefill_only and req.state is ReqState.PREFILLING
        return out

    def _attach_prompt_logprobs(self, req: Request, out: StepOutput) -> None:
        if not req.wants_prompt_logprobs or req.prompt_logprobs_sent:
            return
        start = req.logprob_start_len or 0
        values = list(req.prompt_logprobs or [])
        tops = list(req.prompt_top_logprobs or [])
        if start == 0:  # token 0 has no context
            values, tops = [None, *values], [None, *tops]
        out.prompt_logprobs = values
        out.prompt_top_logprobs = tops if req.top_logprobs_num > 0 else None
        req.prompt_logprobs_sent = True
        req.prompt_logprobs = req.prompt_top_logprobs = None

    def admit_first(
        self,
        req: Request,
        token_id: int,
        logprob: float | None,
        top_logprobs: list[tuple[int, float]] | None,
    ) -> StepOutput:
        """Decode role: the first token came from the prefill side."""
        req.prompt_logprobs_sent = True  # computed (or not) on the prefill side
        if req.sampling.max_new_tokens == 0:
            return StepOutput(req.rid, finish_reason=FinishReason("length"))
        return self._emit(req, token_id, (logprob, top_logprobs))
