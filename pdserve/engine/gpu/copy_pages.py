"""Page-to-page copy between two KV pools on the GPU, one kernel for any page ids; used by
the CUDA IPC KV transport in worker processes (GPU only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 2048  # 16 KiB of int64 words per program
NUM_WARPS = 4


@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, ids_ptr, num_pairs, words_per_page, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < words_per_page
    src_page = tl.load(ids_ptr + pair).to(tl.int64)
    dst_page = tl.load(ids_ptr + num_pairs + pair).to(tl.int64)
    words = tl.load(src_ptr + src_page * words_per_page + offs, mask=mask)
    tl.store(dst_ptr + dst_page * words_per_page + offs, words, mask=mask)


def copy_pages(
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    ids: torch.Tensor,
    block_words: int = BLOCK_WORDS,
    num_warps: int = NUM_WARPS,
) -> None:
    """dst_pages[ids[1, i]] = src_pages[ids[0, i]] for two pools [num_pages, page words] of
    one dtype on one device (int64 words where pages allow), in one pass over the bytes (no
    gather buffer); `ids` is a contiguous int32 or int64 [2, n] tensor on that device."""
    num_pairs = ids.shape[1]
    words = src_pages.shape[1]
    grid = (num_pairs, triton.cdiv(words, block_words))
    _copy_pages_kernel[grid](
        src_pages, dst_pages, ids, num_pairs, words, BLOCK=block_words, num_warps=num_warps
    )
