"""Page-to-page copy between two KV pools on the GPU, one kernel for any page ids; used by
the CUDA IPC KV transport in worker processes (GPU only).

The kernel gets the destination as an element offset from the source pool, not as a
tensor: one pointer fewer for Triton's launcher to ask the driver about on every launch
(measured on an H100: no faster for a pool mapped from another process by CUDA IPC)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 2048  # 16 KiB of int64 words per program
NUM_WARPS = 4


@triton.jit(do_not_specialize=["ids_offset"])
def _copy_pages_kernel(
    src_ptr, dst_offset, ids_ptr, ids_offset, num_pairs, words_per_page, BLOCK: tl.constexpr
):  # fmt: skip
    dst_ptr = src_ptr + dst_offset
    ids_ptr += ids_offset
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
    *,
    ids_offset: int = 0,
    num_pairs: int | None = None,
) -> None:
    """dst_pages[ids[1, i]] = src_pages[ids[0, i]] for two pools [num_pages, page words] of
    one dtype on one device (int64 words where pages allow), in one pass over the bytes (no
    gather buffer); `ids` is a contiguous int32 or int64 [2, n] tensor on that device. Or,
    with `num_pairs`, the pairs are the 2 * num_pairs elements of flat `ids` from
    `ids_offset` on (sources, then destinations): ids the GPU reads in place, e.g. from
    host memory registered with CUDA, with no upload."""
    if num_pairs is None:
        num_pairs = ids.shape[1]
    words = src_pages.shape[1]
    assert src_pages.dtype == dst_pages.dtype and src_pages.device == dst_pages.device
    offset_nbytes = dst_pages.data_ptr() - src_pages.data_ptr()
    assert offset_nbytes % src_pages.element_size() == 0, "pools not aligned to their words"
    grid = (num_pairs, triton.cdiv(words, block_words))
    _copy_pages_kernel[grid](
        src_pages, offset_nbytes // src_pages.element_size(), ids, ids_offset, num_pairs,
        words, BLOCK=block_words, num_warps=num_warps,
    )  # fmt: skip
