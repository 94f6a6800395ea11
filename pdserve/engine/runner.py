"""Runs one scheduled batch through the model: builds the index tensors, runs the forward
pass, and returns logits only for the rows that are needed. Worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine import model as llama
from pdserve.engine.attention import Segment, build_attn_meta
from pdserve.engine.host_copy import host_to_device
from pdserve.engine.loader import LoadedModel
from pdserve.engine.overlap import DecodeRow, LaunchedDecode, ahead_token_ids, decode_rows
from pdserve.engine.request import Request
from pdserve.engine.rope import rope_tables
from pdserve.engine.sampler import sample_on_device, sample_spec
from pdserve.engine.scheduler import Batch


@dataclass
class ItemRows:
    """Where one request's results sit in the step's logits."""

    req: Request
    num_tokens: int  # tokens whose KV this step computed
    sample_row: int | None  # None: a prefill chunk that is not the last one
    prompt_positions: list[int] = field(default_factory=list)  # each predicts position + 1
    prompt_rows: list[int] = field(default_factory=list)


def _prompt_positions(req: Request, start: int, num_tokens: int) -> list[int]:
    """Positions of this chunk whose logits give a prompt token's logprob."""
    if not req.wants_prompt_logprobs or req.prompt_logprobs_sent:
        return []
    first = max(start, (req.logprob_start_len or 0) - 1, 0)
    return list(range(first, min(start + num_tokens, len(req.prompt_ids) - 1)))


class ModelRunner:
    def __init__(self, model: LoadedModel, kv_pool: torch.Tensor, page_size: int, max_len: int):
        self.model = model
        self.kv_pool = kv_pool
        self.page_size = page_size
        self.device = kv_pool.device
        args = model.args
        self.cos, self.sin = rope_tables(
            args.head_dim, args.rope_theta, args.rope_scaling, max_len, self.device, kv_pool.dtype
        )

    def zero_pages(self, page_ids: list[int]) -> None:
        """Fresh pages may hold garbage (NaN) that masked attention would still multiply."""
        if page_ids:
            self.kv_pool.index_fill_(0, host_to_device(page_ids, self.device), 0)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[ItemRows]]:
        """float32 logits [rows, vocab] and, per request, which rows are its."""
        segments: list[Segment] = []
        token_ids: list[int] = []
        positions: list[int] = []
        items: list[ItemRows] = []
        hidden_rows: list[int] = []
        work = [(c.req, c.start, c.num_tokens, c.is_last) for c in batch.prefill]
        work += [(req, req.seq_len - 1, 1, True) for req in batch.decode]
        for req, start, num_tokens, is_last in work:
            offset = len(token_ids)
            span = range(start, start + num_tokens)
            segments.append(Segment(req.page_ids, start, num_tokens))
            token_ids.extend(req.token_at(p) for p in span)
            positions.extend(span)
            item = ItemRows(req, num_tokens, None, _prompt_positions(req, start, num_tokens))
            for p in item.prompt_positions:
                item.prompt_rows.append(len(hidden_rows))
                hidden_rows.append(offset + p - start)
            if is_last:
                item.sample_row = len(hidden_rows)
                hidden_rows.append(offset + num_tokens - 1)
            items.append(item)
        logits = self._forward(segments, token_ids, positions, hidden_rows)
        return logits, items

    @torch.inference_mode()
    def launch_decode(self, reqs: list[Request], previous: LaunchedDecode | None) -> LaunchedDecode:
        """Queue a decode step of `reqs` and the sampling of their next tokens, returning
        before they finish where the device allows. A request of the `previous` launch
        decodes the token that launch sampled for it (here read back on the host: this is
        the CPU path; the GPU runner keeps it on the device)."""
        rows = decode_rows(reqs, previous)
        prev_ids = previous.token_ids() if previous else []
        token_ids = [r.token_id if r.prev_row is None else prev_ids[r.prev_row] for r in rows]
        segments = [Segment(r.req.page_ids, r.position, 1) for r in rows]
        positions = [r.position for r in rows]
        logits = self._forward(segments, token_ids, positions, list(range(len(rows))))
        return LaunchedDecode.start(reqs, self.sample_decode(logits, rows, previous))

    def sample_decode(
        self, logits: torch.Tensor, rows: list[DecodeRow], previous: LaunchedDecode | None
    ) -> torch.Tensor:
        """The launched step's tokens, on the device. Penalized rows count their token still
        in flight from the previous step's device tensor (the same code on every device)."""
        eos_ids = self.model.eos_token_ids
        specs = [sample_spec(r.req, eos_ids, r.num_ahead) for r in rows]
        penalized = any(s.penalty is not None for s in specs)
        ahead_ids = ahead_token_ids(rows, previous, self.device) if penalized else None
        return sample_on_device(logits, specs, ahead_ids)

    def _forward(
        self, segments: list[Segment], token_ids: list[int], positions: list[int], rows: list[int]
    ) -> torch.Tensor:
        hidden = self._hidden_states(segments, token_ids, positions)
        if not rows:
            return hidden.new_zeros(0, self.model.args.vocab_size, dtype=torch.float32)
        if rows != list(range(len(token_ids))):
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return llama.logits(self.model.weights, hidden)

    def _hidden_states(
        self, segments: list[Segment], token_ids: list[int], positions: list[int]
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's new tokens; stores their K/V."""
        meta = build_attn_meta(segments, self.page_size, self.device)
        position_index = torch.tensor(positions, device=self.device)
        return llama.forward(
            self.model.weights,
            self.model.args,
            torch.tensor(token_ids, device=self.device),
            self.cos[position_index],
            self.sin[position_index],
            self.kv_pool,
            meta,
        )
