"""Host time of a cuda_ipc copy launch for page lists too long for the grant's completion
slot, the transport's two paths: the ids written into its pinned ring and read there in
place (the usual one), and, while the ring is full, uploaded into a fixed device buffer
(one pageable non-blocking copy); both launch the page-copy kernel through its compiled
launcher. Against the path before both (a new device tensor of the ids, and the kernel
through Triton's JIT), in the same run, on an idle stream and behind a busy one (as under
a step). (Ids that fit the slot are read in place from it.) GPU only.

Run: `python -m pdserve.bench.copy_launch_bench [--pages 8 512]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

POOL_PAGES = 1024
PAGE_NBYTES = 2 << 20
BUSY_CYCLES = 20_000_000  # torch.cuda._sleep before each timed call: ~10 ms of queued work


def host_us(fn, rounds: int, busy: bool) -> float:
    """Median host microseconds of `fn` (the GPU idle between calls; queued work when busy)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(BUSY_CYCLES)
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times[rounds // 10 :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from pdserve.disagg.transfer.ipc_grants import Copiers, IdRing
    from pdserve.engine.gpu.copy_pages import PageCopier, copy_pages
    from pdserve.engine.gpu.stream_ops import current_stream_handle

    device = torch.device("cuda")
    src = torch.zeros(POOL_PAGES, PAGE_NBYTES // 8, dtype=torch.int64, device=device)
    dst = torch.zeros_like(src)
    buffer = torch.empty(2 * POOL_PAGES, dtype=torch.int32, device=device)
    ring = torch.empty(4 * POOL_PAGES, dtype=torch.int32, pin_memory=True)
    copier = PageCopier(src, dst, buffer, direct=True)
    copiers = Copiers(  # as cuda_ipc makes them
        in_slots=copier,
        in_ring=PageCopier(src, dst, ring, direct=True),
        ring=IdRing(ring.numpy()),
        uploaded=copier,
        ids=buffer,
    )
    rng = np.random.default_rng(0)
    print(f"device: {torch.cuda.get_device_name()}; host us per launch (median)")
    header = ["pages", "stream", "JIT, new ids", "upload", "ring", "upload/JIT", "ring/JIT"]
    print(" ".join(f"{h:>12}" for h in header))
    for num_pages in args.pages:
        pairs = np.stack([rng.permutation(POOL_PAGES)[:num_pages] for _ in range(2)])
        pairs = pairs.astype(np.int32)

        def before(pairs: np.ndarray = pairs) -> None:  # a device tensor per copy, the JIT
            ids = torch.from_numpy(pairs.copy()).to(device, non_blocking=True)
            copy_pages(src, dst, ids)

        def upload(pairs: np.ndarray = pairs) -> None:  # the transport's, ring full
            copiers.upload(pairs[0], pairs[1], current_stream_handle(device))

        def in_ring(pairs: np.ndarray = pairs) -> None:  # the transport's usual path
            # Each timed call comes after a synchronize: every earlier copy has run.
            copiers.long(pairs[0], pairs[1], lambda: True, current_stream_handle(device))

        for busy in (False, True):
            rounds = args.rounds if not busy else max(20, args.rounds // 6)
            jit_us, upload_us, ring_us = (
                host_us(fn, rounds, busy) for fn in (before, upload, in_ring)
            )
            row = [num_pages, "busy" if busy else "idle", f"{jit_us:.1f}", f"{upload_us:.1f}"]
            row += [f"{ring_us:.1f}", f"{upload_us / jit_us:.2f}", f"{ring_us / jit_us:.2f}"]
            print(" ".join(f"{v:>12}" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
