"""Page-to-page copy between two KV pools on the GPU, one kernel for any page ids; used by
the CUDA IPC KV transport in worker processes (GPU only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 2048  # 16 KiB of int64 words per program
NUM_WARPS = 4


@triton.jit
def _copy_pages_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, words_per_page, BLOCK: tl.constexpr
):
    pair = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < words_per_page
    src_page = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_page = tl.load(dst_ids_ptr + pair).to(tl.int64)
    words = tl.load(src_ptr + src_page * words_per_page + offs, mask=mask)
    tl.store(dst_ptr + dst_page * words_per_page + offs, words, mask=mask)


def copy_pages(
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    block_words: int = BLOCK_WORDS,
    num_warps: int = NUM_WARPS,
) -> None:
    """dst_pages[dst_ids[i]] = src_pages[src_ids[i]] for uint8 pools [num_pages, page_nbytes]
    on one device, in one pass over the bytes (no gather buffer); ids are int64 on that device."""
    page_nbytes = src_pages.shape[1]
    if page_nbytes % 8 == 0:
        src_pages, dst_pages = src_pages.view(torch.int64), dst_pages.view(torch.int64)
    words = src_pages.shape[1]
    grid = (src_ids.numel(), triton.cdiv(words, block_words))
    _copy_pages_kernel[grid](
        src_pages, dst_pages, src_ids, dst_ids, words, BLOCK=block_words, num_warps=num_warps
    )
