"""Page-to-page copy between two KV pools on the GPU, one kernel for any page ids; used by
the CUDA IPC KV transport in worker processes (GPU only).

The kernel gets the destination as an element offset from the source pool, not as a
tensor. `PageCopier` launches it between two fixed pools with ids read in place from one
fixed buffer: after the first launch it calls the compiled kernel's launcher itself, with
integer pointers, skipping Triton's per-call argument binding, cache lookup and driver
pointer queries (the bulk of a launch's host time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from pdserve.engine.gpu.stream_ops import current_stream_handle, device_pointer

log = logging.getLogger(__name__)

BLOCK_WORDS = 2048  # 16 KiB of int64 words per program
NUM_WARPS = 4


# Not specialised on the values that change from call to call, so one compiled kernel
# serves every launch of a PageCopier. dst_offset is fixed for a PageCopier and stays
# specialised: its divisibility tells the compiler the destination's alignment, which
# vectorised stores need.
@triton.jit(do_not_specialize=["ids_offset", "num_pairs"])
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
):  # -> the compiled kernel Triton launched
    """dst_pages[ids[1, i]] = src_pages[ids[0, i]] for two pools [num_pages, page words] of
    one dtype on one device (int64 words where pages allow), in one pass over the bytes (no
    gather buffer); `ids` is a contiguous int32 or int64 [2, n] tensor on that device. Or,
    with `num_pairs`, the pairs are the 2 * num_pairs elements of flat `ids` from
    `ids_offset` on (sources, then destinations): ids the GPU reads in place, e.g. from
    host memory registered with CUDA, with no upload. Returns the compiled kernel."""
    if num_pairs is None:
        num_pairs = ids.shape[1]
    words = src_pages.shape[1]
    grid = (num_pairs, triton.cdiv(words, block_words))
    return _copy_pages_kernel[grid](
        src_pages, _dst_offset(src_pages, dst_pages), ids, ids_offset, num_pairs,
        words, BLOCK=block_words, num_warps=num_warps,
    )  # fmt: skip


def _dst_offset(src_pages: torch.Tensor, dst_pages: torch.Tensor) -> int:
    """Where dst_pages starts, in elements from src_pages (one dtype, one device)."""
    assert src_pages.dtype == dst_pages.dtype and src_pages.device == dst_pages.device
    offset_nbytes = dst_pages.data_ptr() - src_pages.data_ptr()
    assert offset_nbytes % src_pages.element_size() == 0, "pools not aligned to their words"
    return offset_nbytes // src_pages.element_size()


class PageCopier:
    """`copier(ids_offset, num_pairs)`: copy_pages(src_pages, dst_pages, ids, ids_offset=,
    num_pairs=) on the current stream, for pools and an ids buffer fixed for its lifetime
    (the buffer is e.g. host memory registered with CUDA; the kernel reads it in place).
    `direct`: launch through the compiled kernel's own launcher after the first call, where
    this Triton's launcher convention is known (else every call goes through the JIT)."""

    def __init__(
        self, src_pages: torch.Tensor, dst_pages: torch.Tensor, ids: torch.Tensor, direct: bool
    ) -> None:
        self.src_pages, self.dst_pages, self.ids = src_pages, dst_pages, ids
        self.device = src_pages.device
        self._dst_offset = _dst_offset(src_pages, dst_pages)
        self._words = src_pages.shape[1]
        self._blocks = triton.cdiv(self._words, BLOCK_WORDS)
        self._direct = direct
        self._launch: Callable[[int, int, int], None] | None = None

    @property
    def launches_direct(self) -> bool:
        """Later calls skip Triton's JIT (known after the first call)."""
        return self._launch is not None

    def __call__(self, ids_offset: int, num_pairs: int, stream: int | None = None) -> None:
        """`stream`: the current stream's handle where the caller has it already."""
        if self._launch is not None:
            if stream is None:
                stream = current_stream_handle(self.device)
            return self._launch(stream, ids_offset, num_pairs)
        kernel = copy_pages(
            self.src_pages, self.dst_pages, self.ids, ids_offset=ids_offset, num_pairs=num_pairs
        )
        if self._direct:
            self._launch = self._direct_launcher(kernel)

    def _direct_launcher(self, kernel) -> Callable[[int, int, int], None] | None:
        """(stream, ids_offset, num_pairs) -> None calling `kernel`'s launcher with the
        arguments in the order of its signature, constexprs included, as this Triton's JIT
        does; None where the compiled kernel does not say so (another Triton)."""
        src = getattr(kernel, "src", None)
        signature = getattr(src, "signature", None)
        names = getattr(getattr(src, "fn", None), "arg_names", None)
        if (
            not isinstance(signature, dict)
            or names is None
            or signature.get("BLOCK") != "constexpr"
        ):
            log.info("page copies launch through Triton's JIT (unknown launcher convention)")
            return None
        run, function, metadata = kernel.run, kernel.function, kernel.packed_metadata
        fixed = {
            "src_ptr": device_pointer(self.src_pages.data_ptr()),
            "dst_offset": self._dst_offset,
            "ids_ptr": device_pointer(self.ids.data_ptr()),
            "words_per_page": self._words,
            "BLOCK": BLOCK_WORDS,
        }
        order = [fixed.get(name) for name in names]
        at_offset, at_pairs = names.index("ids_offset"), names.index("num_pairs")
        blocks = self._blocks

        def launch(stream: int, ids_offset: int, num_pairs: int) -> None:
            args = order.copy()
            args[at_offset], args[at_pairs] = ids_offset, num_pairs
            run(num_pairs, blocks, 1, stream, function, metadata, None, None, None, *args)

        return launch
