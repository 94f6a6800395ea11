"""Attention over the paged KV pool (gather each sequence's pages, then SDPA); worker process.

One code path serves prefill chunks and decode: a step is a ragged batch of segments
(sequence, first position, number of new tokens). New K/V are written to their page slots
first, then each segment's queries attend over its whole cached prefix with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    page_ids: list[int]  # the sequence's page table
    start: int  # position of the first new token
    num_tokens: int  # new tokens in this step


@dataclass
class AttnMeta:
    """Per-step index tensors, built once and shared by every layer."""

    write_page_ids: torch.Tensor  # [T] page of each new token
    write_offsets: torch.Tensor  # [T] slot inside that page
    block_table: torch.Tensor  # [B * P] pages to gather, padded with the sequence's own page
    mask: torch.Tensor  # [B, 1, Q, P * page_size] True where a query may attend
    pad_index: torch.Tensor | None  # [T] row of each token in the padded [B * Q] layout
    num_seqs: int
    max_new_tokens: int  # Q: most new tokens of one segment


def build_attn_meta(segments: list[Segment], page_size: int, device: torch.device) -> AttnMeta:
    positions = [s.start + i for s in segments for i in range(s.num_tokens)]
    owners = [s for s in segments for _ in range(s.num_tokens)]
    write_page_ids = [
        seg.page_ids[pos // page_size] for seg, pos in zip(owners, positions, strict=True)
    ]
    max_q = max(s.num_tokens for s in segments)
    max_pages = max(-(-(s.start + s.num_tokens) // page_size) for s in segments)
    block_table = [
        s.page_ids[:max_pages] + [s.page_ids[0]] * (max_pages - len(s.page_ids[:max_pages]))
        for s in segments
    ]
    # Padded query rows get position 0 so they attend to one real key (no all-masked row,
    # whose softmax would be NaN); their output is dropped.
    q_positions = [[s.start + i if i < s.num_tokens else 0 for i in range(max_q)] for s in segments]
    key_positions = torch.arange(max_pages * page_size, device=device)
    q_pos = torch.tensor(q_positions, device=device)
    mask = (key_positions[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
    ragged = any(s.num_tokens != max_q for s in segments)
    pad_index = None
    if ragged:
        rows = [b * max_q + i for b, s in enumerate(segments) for i in range(s.num_tokens)]
        pad_index = torch.tensor(rows, device=device)
    return AttnMeta(
        write_page_ids=torch.tensor(write_page_ids, device=device),
        write_offsets=torch.tensor([p % page_size for p in positions], device=device),
        block_table=torch.tensor(block_table, device=device).flatten(),
        mask=mask,
        pad_index=pad_index,
        num_seqs=len(segments),
        max_new_tokens=max_q,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttnMeta,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for the new tokens; kv_layer [N, 2, page_size, KVH, D]
    (a view into the pool for one layer). Returns [T, H * D]."""
    kv_layer[:, 0][meta.write_page_ids, meta.write_offsets] = k
    kv_layer[:, 1][meta.write_page_ids, meta.write_offsets] = v
    num_seqs, max_q = meta.num_seqs, meta.max_new_tokens
    _, _, page_size, num_kv_heads, head_dim = kv_layer.shape
    pages = kv_layer.index_select(0, meta.block_table)
    # One copy lays K and V out as SDPA reads them: [B, KVH, S, D], contiguous.
    pages = pages.view(num_seqs, -1, 2, page_size, num_kv_heads, head_dim)
    kv = pages.permute(2, 0, 4, 1, 3, 5).reshape(2, num_seqs, num_kv_heads, -1, head_dim)
    keys, values = kv[0], kv[1]
    num_heads = q.shape[1]
    if meta.pad_index is not None:
        padded = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
        padded[meta.pad_index] = q
        q = padded
    queries = q.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.mask, enable_gqa=num_heads != num_kv_heads
    )
    out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads * head_dim)
    if meta.pad_index is not None:
        out = out[meta.pad_index]
    return out
