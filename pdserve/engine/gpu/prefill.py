"""GPU prefill: a ragged batch of prompt chunks through the fused layer stack, attention
reading the KV pages in place (cached prefix and the chunk's own tokens). Worker process.

The host packs every index the step needs into one int32 array, sent in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.attention import Segment
from pdserve.engine.gpu.kernels import rope_and_store_tokens
from pdserve.engine.gpu.layers import final_hidden, qk_norm_of
from pdserve.engine.gpu.prefill_attention import paged_prefill_attention
from pdserve.engine.model import ModelArgs, ModelWeights


@dataclass
class PrefillMeta:
    """Device index tensors (int32) of one prefill step, views into one buffer."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] KV slot of each new token: page * page_size + offset
    cu_q: torch.Tensor  # [B + 1] first row of each chunk, then T
    starts: torch.Tensor  # [B] position of each chunk's first token
    page_table: torch.Tensor  # [B, P] each chunk's pages, zero-padded
    max_q: int  # most new tokens of one chunk


def pack_prefill_meta(
    segments: list[Segment], token_ids: list[int], page_size: int, device: torch.device
) -> PrefillMeta:
    num_tokens, num_chunks = len(token_ids), len(segments)
    num_cols = max(-(-(s.start + s.num_tokens) // page_size) for s in segments)
    sizes = [num_tokens] * 3 + [num_chunks + 1, num_chunks, num_chunks * num_cols]
    ends = np.cumsum(sizes)
    flat = np.zeros(int(ends[-1]), dtype=np.int32)
    tokens, positions, slots, cu_q, starts, table = np.split(flat, ends[:-1])
    tokens[:] = token_ids
    table = table.reshape(num_chunks, num_cols)
    row = 0
    for b, seg in enumerate(segments):
        num_pages = -(-(seg.start + seg.num_tokens) // page_size)
        table[b, :num_pages] = seg.page_ids[:num_pages]
        pos = np.arange(seg.start, seg.start + seg.num_tokens, dtype=np.int32)
        positions[row : row + seg.num_tokens] = pos
        slots[row : row + seg.num_tokens] = table[b, pos // page_size] * page_size + pos % page_size
        cu_q[b], starts[b] = row, seg.start
        row += seg.num_tokens
    cu_q[num_chunks] = row
    host = torch.from_numpy(flat)
    if device.type == "cuda":  # pinned: the copy is queued, the host goes on
        host = host.pin_memory()
    views = host.to(device, non_blocking=True).split(sizes)
    return PrefillMeta(
        token_ids=views[0],
        positions=views[1],
        slots=views[2],
        cu_q=views[3],
        starts=views[4],
        page_table=views[5].view(num_chunks, num_cols),
        max_q=max(s.num_tokens for s in segments),
    )


def prefill_hidden(
    weights: ModelWeights,
    args: ModelArgs,
    kv_pool: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: PrefillMeta,
) -> torch.Tensor:
    """Final hidden states [T, hidden] of the step's new tokens; stores their K/V."""

    def attend(qkv: torch.Tensor, i: int) -> torch.Tensor:
        q = rope_and_store_tokens(
            qkv, cos, sin, meta.positions, meta.slots, kv_pool, i,
            args.num_heads, args.num_kv_heads, qk_norm_of(weights.layers[i], args.rms_norm_eps),
        )  # fmt: skip
        return paged_prefill_attention(
            q, kv_pool, i, meta.cu_q, meta.starts, meta.page_table, meta.max_q
        )

    return final_hidden(weights, args, meta.token_ids, attend)
