"""The Triton decode kernels against the plain PyTorch model code they replace: fresh random
inputs each case, outputs poisoned beforehand, page tables scattered over the pool."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine import model as llama  # noqa: E402
from pdserve.engine.attention import Segment, build_attn_meta, paged_attention  # noqa: E402
from pdserve.engine.gpu.decode import pack_meta  # noqa: E402
from pdserve.engine.gpu.kernels import rms_norm, rope_and_store_kv, silu_mul  # noqa: E402
from pdserve.engine.gpu.paged_attention import paged_decode_attention  # noqa: E402
from pdserve.engine.rope import apply_rope, rope_tables  # noqa: E402
from tests.gpu.numerics import rel_err, tol  # noqa: E402

pytestmark = pytest.mark.interpretable


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_model(device, dtype, with_residual):
    x = torch.randn(7, 320, device=device, dtype=dtype)
    w = 1 + 0.1 * torch.randn(320, device=device, dtype=dtype)
    residual = torch.randn_like(x) if with_residual else None
    expected_sum = residual + x if with_residual else x
    ref = llama.rms_norm(expected_sum, w, 1e-5)
    res_in = residual.clone() if with_residual else None
    out = rms_norm(x, w, 1e-5, res_in)
    assert rel_err(out, ref) < tol(dtype)
    if with_residual:
        assert torch.equal(res_in, expected_sum)


def test_silu_mul_matches_model(device, dtype):
    gate_up = torch.randn(5, 2 * 1500, device=device, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert rel_err(silu_mul(gate_up), ref) < tol(dtype)


def random_pool(device, dtype, num_pages=40, layers=3, page_size=16, kv_heads=2, head_dim=64):
    return torch.randn(num_pages, layers, 2, page_size, kv_heads, head_dim, device=device).to(dtype)


@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_rope_store_writes_rotated_k_and_v_into_the_page_slot(device, dtype, head_dim):
    heads, kv_heads, layer = 8, 2, 1
    pool = random_pool(device, dtype, kv_heads=kv_heads, head_dim=head_dim)
    before = pool.clone()
    cos, sin = rope_tables(head_dim, 10000.0, None, 256, device, dtype)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    rows = [(5, 17, [3, 9]), (6, 0, [12]), (7, 200, list(range(20, 33)))]
    meta = pack_meta(rows, 4, 13).to(device)  # and one padding row
    q_out = rope_and_store_kv(qkv, cos, sin, meta[:3], pool, layer, heads, kv_heads)
    positions = torch.tensor([17, 0, 200], device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q_ref = apply_rope(q.view(3, heads, head_dim), cos[positions], sin[positions])
    k_ref = apply_rope(k.view(3, kv_heads, head_dim), cos[positions], sin[positions])
    assert rel_err(q_out, q_ref) < tol(dtype)
    expected = before.clone()
    for i, (page, slot) in enumerate([(9, 1), (12, 0), (32, 8)]):
        expected[page, layer, 0, slot] = pool[page, layer, 0, slot]  # compared below
        assert rel_err(pool[page, layer, 0, slot], k_ref[i]) < tol(dtype)
        assert torch.equal(pool[page, layer, 1, slot], v[i].view(kv_heads, head_dim))
        expected[page, layer, 1, slot] = v[i].view(kv_heads, head_dim)
    assert torch.equal(pool, expected), "a slot outside the three new tokens changed"


@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_rope_store_with_qk_norm_matches_model_qk_norm_then_rope(device, dtype, head_dim):
    heads, kv_heads, layer, eps = 4, 2, 0, 1e-6
    pool = random_pool(device, dtype, kv_heads=kv_heads, head_dim=head_dim)
    cos, sin = rope_tables(head_dim, 1e6, None, 256, device, dtype)
    qkv = 3 * torch.randn(2, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q_w, k_w = (1 + 0.3 * torch.randn(2, head_dim, device=device)).to(dtype)
    meta = pack_meta([(5, 40, [3, 7, 9]), (6, 3, [12])], 2, 3).to(device)
    q_out = rope_and_store_kv(qkv, cos, sin, meta, pool, layer, heads, kv_heads, (q_w, k_w, eps))
    positions = torch.tensor([40, 3], device=device)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(2, heads + kv_heads, head_dim)
    qk_ref = apply_rope(llama.qk_norm(qk, q_w, k_w, heads, eps), cos[positions], sin[positions])
    assert rel_err(q_out, qk_ref[:, :heads]) < tol(dtype)
    assert rel_err(pool[9, layer, 0, 8], qk_ref[0, heads:]) < tol(dtype)  # position 40
    assert rel_err(pool[12, layer, 0, 3], qk_ref[1, heads:]) < tol(dtype)


def reference_decode(q, pool, layer, seqs, page_size):
    """The engine's gather + SDPA attention for one new token per sequence, KV in place."""
    segments = [Segment(pages, seq_len - 1, 1) for seq_len, pages in seqs]
    meta = build_attn_meta(segments, page_size, q.device)
    k = pool[:, layer, 0][meta.write_page_ids, meta.write_offsets]
    v = pool[:, layer, 1][meta.write_page_ids, meta.write_offsets]
    return paged_attention(q, k, v, pool[:, layer], meta)


@pytest.mark.parametrize("num_splits", [1, 4, 32])
@pytest.mark.parametrize(
    "head_dim,kv_heads,group", [(64, 2, 4), (128, 1, 8), (64, 4, 1), (24, 1, 4), (80, 2, 3)]
)
def test_paged_decode_attention_matches_gather_sdpa(
    device, dtype, num_splits, head_dim, kv_heads, group
):
    page_size, layer = 16, 2
    pool = random_pool(device, dtype, num_pages=64, kv_heads=kv_heads, head_dim=head_dim)
    gen = torch.Generator().manual_seed(num_splits * 7 + head_dim)
    order = torch.randperm(64, generator=gen).tolist()
    # one token, exactly one page, one past a page, a long scattered sequence
    lens = [1, 16, 17, 300]
    seqs, start = [], 0
    for n in lens:
        num_pages = -(-n // page_size)
        seqs.append((n, order[start : start + num_pages]))
        start += num_pages
    q = torch.randn(len(lens), kv_heads * group, head_dim, device=device, dtype=dtype)
    ref = reference_decode(q, pool, layer, seqs, page_size)
    rows = [(0, n - 1, pages) for n, pages in seqs]
    meta = pack_meta(rows, len(lens) + 1, 20).to(device)  # plus a padding row
    q_padded = torch.cat([q, torch.randn_like(q[:1])])
    out = paged_decode_attention(q_padded, pool, layer, meta, num_splits)
    assert rel_err(out[: len(lens)], ref) < tol(dtype)
    assert torch.equal(out[len(lens) :], torch.zeros_like(out[len(lens) :]))


@pytest.mark.interpretable
@pytest.mark.parametrize("dst_first", [False, True], ids=["dst-after", "dst-before"])
def test_copy_pages_moves_exactly_the_paired_pages(device, dst_first):
    """The kernel reaches the destination pool by its offset from the source pool (either
    side of it in memory): paired pages are copied, every other page is left alone."""
    from pdserve.engine.gpu.copy_pages import copy_pages

    pools = [torch.full((12, 40), -1, dtype=torch.int64, device=device) for _ in range(2)]
    dst, src = pools if dst_first else pools[::-1]
    src.copy_(torch.arange(src.numel(), device=device).view_as(src))
    before = dst.clone()
    ids = torch.tensor([[3, 0, 11, 7], [5, 9, 1, 2]], dtype=torch.int32, device=device)
    copy_pages(src, dst, ids, block_words=16)
    assert torch.equal(dst[ids[1].long()], src[ids[0].long()])
    untouched = [p for p in range(12) if p not in ids[1].tolist()]
    assert torch.equal(dst[untouched], before[untouched])


@pytest.mark.interpretable
def test_copy_pages_reads_its_ids_in_place_from_a_flat_buffer(device):
    """Ids at an offset of a larger int32 buffer (as in a completion slot's payload):
    sources, then destinations."""
    from pdserve.engine.gpu.copy_pages import copy_pages

    src = torch.arange(12 * 40, dtype=torch.int64, device=device).view(12, 40)
    dst = torch.full_like(src, -1)
    flat = torch.full((64,), 99, dtype=torch.int32, device=device)
    flat[21:27] = torch.tensor([3, 0, 11, 5, 9, 1], dtype=torch.int32)
    copy_pages(src, dst, flat, block_words=16, ids_offset=21, num_pairs=3)
    assert torch.equal(dst[[5, 9, 1]], src[[3, 0, 11]])
    assert (dst[[p for p in range(12) if p not in (5, 9, 1)]] == -1).all()


@pytest.mark.interpretable
def test_page_copier_copies_its_pairs_on_any_backend(device):
    """Repeated copies between fixed pools, ids read in place at moving offsets (under the
    interpreter every call goes through the JIT: no compiled launcher to call)."""
    from pdserve.engine.gpu.copy_pages import PageCopier

    src = torch.arange(12 * 40, dtype=torch.int64, device=device).view(12, 40)
    dst = torch.full_like(src, -1)
    ids = torch.zeros(64, dtype=torch.int32, device=device)
    copier = PageCopier(src, dst, ids, direct=True)
    ids[5:9] = torch.tensor([3, 0, 7, 2], dtype=torch.int32)
    copier(5, 2)
    ids[30:32] = torch.tensor([11, 4], dtype=torch.int32)
    copier(30, 1)
    assert torch.equal(dst[[7, 2, 4]], src[[3, 0, 11]])
    assert (dst[[p for p in range(12) if p not in (7, 2, 4)]] == -1).all()


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a compiled kernel's launcher and CUDA streams"
)


@needs_cuda
@pytest.mark.parametrize("ids_on", ["device", "pinned-host"])
@pytest.mark.parametrize("dst_first", [False, True], ids=["dst-after", "dst-before"])
def test_page_copier_launches_directly_after_its_first_copy(ids_on, dst_first):
    """After its first copy (through Triton's JIT) a PageCopier calls the compiled kernel's
    launcher itself; every copy, first or later, moves exactly its pairs, with ids read in
    place at any offset, from device memory or from host memory the GPU maps."""
    from pdserve.engine.gpu.copy_pages import PageCopier

    pools = [torch.full((12, 4096), -1, dtype=torch.int64, device="cuda") for _ in range(2)]
    dst, src = pools if dst_first else pools[::-1]
    src.copy_(torch.arange(src.numel(), device="cuda").view_as(src))
    ids = torch.zeros(256, dtype=torch.int32, pin_memory=ids_on == "pinned-host")
    ids = ids.cuda() if ids_on == "device" else ids
    copier = PageCopier(src, dst, ids, direct=True)
    expected = dst.clone()
    for offset, pairs in [(0, [(3, 5)]), (17, [(0, 9), (11, 1), (7, 2)]), (40, [(4, 11)])]:
        flat = [s for s, _ in pairs] + [d for _, d in pairs]
        ids[offset : offset + len(flat)] = torch.tensor(flat, dtype=torch.int32)
        copier(offset, len(pairs))
        torch.cuda.synchronize()
        for s, d in pairs:
            expected[d] = src[s]
        assert torch.equal(dst, expected)
    assert copier.launches_direct, "this Triton's launcher convention is not known: JIT launches"


@needs_cuda
def test_long_page_lists_read_ids_from_the_ring_and_are_uploaded_while_it_is_full():
    """cuda_ipc's copies whose ids do not fit a slot: the kernel reads them in place from a
    pinned ring; while copies that may still read it fill the ring (here: queued behind a
    sleep), the next list is uploaded instead. Every copy moves exactly its pairs."""
    import numpy as np

    from pdserve.disagg.transfer.ipc_grants import Copiers, IdRing
    from pdserve.engine.gpu.copy_pages import PageCopier
    from pdserve.engine.gpu.stream_ops import current_stream_handle

    src = torch.arange(16 * 4096, dtype=torch.int64, device="cuda").view(16, 4096)
    dst = torch.full_like(src, -1)
    ring = torch.zeros(12, dtype=torch.int32, pin_memory=True)  # 6 pairs
    ids = torch.zeros(32, dtype=torch.int32, device="cuda")
    copiers = Copiers(
        PageCopier(src, dst, ids, direct=True),  # (ids in a slot: not used here)
        PageCopier(src, dst, ring, direct=True),
        IdRing(ring.numpy()),
        PageCopier(src, dst, ids, direct=True),
        ids,
    )
    stream = current_stream_handle(torch.device("cuda"))
    expected = dst.clone()

    def copy(pairs: list[tuple[int, int]]) -> None:
        done = torch.cuda.Event()
        s, d = (np.array(side, dtype=np.int32) for side in zip(*pairs, strict=True))
        copiers.long(s, d, done.query, stream)
        done.record()
        for a, b in pairs:
            expected[b] = src[a]

    copy([(2, 2)])  # compiled and launching directly from here on
    copiers.upload(np.array([2], dtype=np.int32), np.array([2], dtype=np.int32), stream)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the copies below wait behind it
    copy([(3, 5), (0, 9), (11, 1), (7, 2)])  # ring words [0, 8)
    copy([(15, 7)])  # [8, 10)
    assert copiers.ring.held == 2  # neither has run
    copy([(4, 11), (6, 0), (8, 3)])  # 6 words: neither [10, 12) nor [0, 0) holds them
    assert copiers.ring.held == 2  # uploaded instead
    torch.cuda.synchronize()
    assert torch.equal(dst, expected)
    copy([(1, 4)])
    assert copiers.ring.held == 1  # the ring freed once its copies ran
    torch.cuda.synchronize()
    assert torch.equal(dst, expected)


@needs_cuda
def test_a_stream_write_sets_its_flag_only_after_the_work_queued_before_it():
    """cuStreamWriteValue64 on the current stream: the flag in mapped host memory changes
    once the kernel queued before it has run, not at the call."""
    from pdserve.engine.gpu.stream_ops import StreamWriter, current_stream_handle, device_pointer

    flags = torch.zeros(4, dtype=torch.int64, pin_memory=True)
    writer = StreamWriter()
    assert writer.available
    torch.cuda._sleep(400_000_000)  # a few hundred ms of queued GPU work
    stream = current_stream_handle(torch.device("cuda"))
    assert writer.write(stream, device_pointer(flags.data_ptr()) + 2 * 8, 7)
    assert flags.tolist() == [0, 0, 0, 0]  # the sleep still runs
    torch.cuda.synchronize()
    assert flags.tolist() == [0, 0, 7, 0]
