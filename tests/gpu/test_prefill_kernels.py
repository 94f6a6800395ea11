"""The Triton prefill kernels against the engine's PyTorch code: paged prefill attention
against gather + masked SDPA (chunks at position 0 and over a cached prefix, partial and
scattered pages, GQA), and the per-token rope + KV store against apply_rope."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine import model as llama  # noqa: E402
from pdserve.engine.attention import Segment, build_attn_meta, paged_attention  # noqa: E402
from pdserve.engine.gpu.kernels import rope_and_store_tokens  # noqa: E402
from pdserve.engine.gpu.prefill import pack_prefill_meta  # noqa: E402
from pdserve.engine.gpu.prefill_attention import paged_prefill_attention  # noqa: E402
from pdserve.engine.rope import apply_rope, rope_tables  # noqa: E402
from tests.gpu.test_gpu_kernels import random_pool, rel_err, tol  # noqa: E402

pytestmark = pytest.mark.interpretable

PAGE_SIZE = 16
# (start, new tokens): a whole prompt in one chunk, chunks over a cached prefix that ends on
# a page boundary or inside a page, a chunk of several query blocks, one token far in.
CHUNKS = [(0, 5), (16, 16), (37, 40), (0, 130), (70, 75), (250, 1)]


def scattered_segments(chunks, num_pages: int, seed: int) -> list[Segment]:
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    segments, used = [], 0
    for start, n in chunks:
        pages = -(-(start + n) // PAGE_SIZE)
        segments.append(Segment(order[used : used + pages], start, n))
        used += pages
    return segments


def run_both(pool, layer, segments, num_heads, device, dtype):
    """(kernel output, reference output) for the segments' new tokens; the reference also
    stores their K/V, which the kernel then reads in place."""
    num_kv_heads, head_dim = pool.shape[4], pool.shape[5]
    num_tokens = sum(s.num_tokens for s in segments)
    q = torch.randn(num_tokens, num_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    ref = paged_attention(q, k, v, pool[:, layer], build_attn_meta(segments, PAGE_SIZE, device))
    meta = pack_prefill_meta(segments, [0] * num_tokens, PAGE_SIZE, device)
    out = paged_prefill_attention(
        q, pool, layer, meta.cu_q, meta.starts, meta.page_table, meta.max_q
    )
    return out, ref


@pytest.mark.parametrize(
    "head_dim,kv_heads,group", [(64, 2, 4), (128, 1, 8), (64, 4, 1), (24, 1, 4), (80, 2, 3)]
)
def test_paged_prefill_attention_matches_gather_sdpa(device, dtype, head_dim, kv_heads, group):
    pool = random_pool(device, dtype, num_pages=64, kv_heads=kv_heads, head_dim=head_dim)
    segments = scattered_segments(CHUNKS, 64, seed=head_dim + group)
    out, ref = run_both(pool, 2, segments, kv_heads * group, device, dtype)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tol(dtype)
    for i, seg in enumerate(segments):  # every chunk on its own, not only the whole batch
        first = sum(s.num_tokens for s in segments[:i])
        rows = slice(first, first + seg.num_tokens)
        assert rel_err(out[rows], ref[rows]) < tol(dtype), (seg.start, seg.num_tokens)


@pytest.mark.parametrize("page_size_tokens", [1, 16])
def test_paged_prefill_attention_of_one_chunk_from_position_zero(device, dtype, page_size_tokens):
    pool = random_pool(device, dtype, num_pages=300, page_size=page_size_tokens, kv_heads=2)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(5)).tolist()
    num_tokens = 200
    segment = Segment(order[: -(-num_tokens // page_size_tokens)], 0, num_tokens)
    q = torch.randn(num_tokens, 8, 64, device=device, dtype=dtype)
    k = torch.randn(num_tokens, 2, 64, device=device, dtype=dtype)
    v = torch.randn_like(k)
    meta_ref = build_attn_meta([segment], page_size_tokens, device)
    ref = paged_attention(q, k, v, pool[:, 0], meta_ref)
    meta = pack_prefill_meta([segment], [0] * num_tokens, page_size_tokens, device)
    out = paged_prefill_attention(q, pool, 0, meta.cu_q, meta.starts, meta.page_table, 200)
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_rope_store_tokens_writes_rotated_k_and_v_into_their_slots(device, dtype, head_dim):
    heads, kv_heads, layer = 8, 2, 1
    pool = random_pool(device, dtype, kv_heads=kv_heads, head_dim=head_dim)
    before = pool.clone()
    cos, sin = rope_tables(head_dim, 10000.0, None, 256, device, dtype)
    segments = scattered_segments([(0, 3), (30, 20)], 40, seed=head_dim)
    meta = pack_prefill_meta(segments, [0] * 23, PAGE_SIZE, device)
    qkv = torch.randn(23, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q_out = rope_and_store_tokens(
        qkv, cos, sin, meta.positions, meta.slots, pool, layer, heads, kv_heads
    )
    positions = meta.positions.long()
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q_ref = apply_rope(q.view(23, heads, head_dim), cos[positions], sin[positions])
    k_ref = apply_rope(k.view(23, kv_heads, head_dim), cos[positions], sin[positions])
    assert rel_err(q_out, q_ref) < tol(dtype)
    pages, offsets = meta.slots.long() // PAGE_SIZE, meta.slots.long() % PAGE_SIZE
    assert rel_err(pool[pages, layer, 0, offsets], k_ref) < tol(dtype)
    assert torch.equal(pool[pages, layer, 1, offsets], v.view(23, kv_heads, head_dim))
    expected = before.clone()
    expected[pages, layer, :, offsets] = pool[pages, layer, :, offsets]
    assert torch.equal(pool, expected), "a slot outside the new tokens changed"


@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_rope_store_tokens_with_qk_norm_matches_model_qk_norm_then_rope(device, dtype, head_dim):
    heads, kv_heads, layer, eps = 4, 2, 0, 1e-6
    pool = random_pool(device, dtype, kv_heads=kv_heads, head_dim=head_dim)
    cos, sin = rope_tables(head_dim, 1e6, None, 256, device, dtype)
    segments = scattered_segments([(0, 3), (37, 4)], 40, seed=head_dim + 1)
    meta = pack_prefill_meta(segments, [0] * 7, PAGE_SIZE, device)
    qkv = 3 * torch.randn(7, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q_w, k_w = (1 + 0.3 * torch.randn(2, head_dim, device=device)).to(dtype)
    q_out = rope_and_store_tokens(
        qkv, cos, sin, meta.positions, meta.slots, pool, layer, heads, kv_heads, (q_w, k_w, eps)
    )
    positions = meta.positions.long()
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(7, heads + kv_heads, head_dim)
    qk_ref = apply_rope(llama.qk_norm(qk, q_w, k_w, heads, eps), cos[positions], sin[positions])
    assert rel_err(q_out, qk_ref[:, :heads]) < tol(dtype)
    pages, offsets = meta.slots.long() // PAGE_SIZE, meta.slots.long() % PAGE_SIZE
    assert rel_err(pool[pages, layer, 0, offsets], qk_ref[:, heads:]) < tol(dtype)
