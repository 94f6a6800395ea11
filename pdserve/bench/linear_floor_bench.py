"""The decode step's linear layers at small batch on the GPU: cuBLAS (`F.linear`, what the
decode graphs run by default) and the Triton GEMV (`--decode-gemv on`) on the matrices of
the Llama-3.2-1B and Llama-3-8B shapes, 1 to 4 rows, bf16, each timed as a CUDA graph of 40
calls (as decode runs them) over copies of the matrix that do not fit in L2 together,
against the weight-read floor at the device copy bandwidth measured in the same run, and
against each other. Tells how much of a decode step's distance from its floor the matmuls
account for, and the step total if each matrix took the faster of the two; also the
down projection with SiLU·mul (its own kernel before cuBLAS, fused into the GEMV's input),
not in the step totals. GPU only.

Run: `python -m pdserve.bench.linear_floor_bench [--out-dir DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from pdserve.bench.gpu_bench import median_event_ms
from pdserve.engine.gpu.gemv import gemv
from pdserve.engine.gpu.kernels import silu_mul

# name: [(matrix, N, K)], the decode step's linear layers (q/k/v and gate/up fused)
SHAPES = {
    "llama3.2-1b": [
        ("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048),
        ("down", 2048, 8192), ("lm_head", 128256, 2048),
    ],
    "llama3-8b": [
        ("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
        ("down", 4096, 14336), ("lm_head", 128256, 4096),
    ],
}  # fmt: skip
LAYERS = {"llama3.2-1b": 16, "llama3-8b": 32}
CALLS = 40


COLD_NBYTES = 256 << 20  # weights cycled per matrix: well past the L2 cache (50 MB on an H100)


def graph_us(fns: list) -> float:
    """Microseconds per call of a CUDA graph of CALLS calls cycling through `fns`."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    return 1e3 * median_event_ms(graph.replay, 20) / CALLS


def measure_copy_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second / 1e9."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_event_ms(lambda: dst.copy_(src), 10) / 1e6


def time_matrix(n: int, k: int, rows: int, copy_gbps: float) -> dict[str, float]:
    """Floor, cuBLAS and Triton GEMV microseconds for one [n, k] bf16 matrix and `rows` rows."""
    # As in a decode step, no call finds its weight in L2 from the call before: each one
    # reads another copy of the matrix.
    copies = -(-COLD_NBYTES // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    return dict(
        floor_us=n * k * 2 / copy_gbps / 1e3,
        us=graph_us([lambda w=w: F.linear(x, w) for w in ws]),
        gemv_us=graph_us([lambda w=w: gemv(x, w) for w in ws]),
    )


def time_silu_down(n: int, k: int, rows: int) -> dict[str, float]:
    """The MLP's down projection from the gate_up output, as the decode graphs run it:
    the SiLU·mul kernel then cuBLAS, against the GEMV with SiLU·mul fused into its input."""
    copies = -(-COLD_NBYTES // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=torch.bfloat16)
    return dict(
        us=graph_us([lambda w=w: F.linear(silu_mul(gate_up), w) for w in ws]),
        gemv_us=graph_us([lambda w=w: gemv(gate_up, w, silu_mul_input=True) for w in ws]),
    )


def print_matrix(shape: str, rows: int, name: str, t: dict[str, float]) -> None:
    floor_us, cublas_us, gemv_us = t["floor_us"], t["us"], t["gemv_us"]
    print(
        f"{shape:12} rows {rows} {name:8} floor {floor_us:7.1f} us  cuBLAS {cublas_us:7.1f} us "
        f"({cublas_us / floor_us:4.2f}x)  GEMV {gemv_us:7.1f} us ({gemv_us / floor_us:4.2f}x "
        f"floor, {gemv_us / cublas_us:4.2f}x cuBLAS)"
    )


def print_step(shape: str, rows: int, totals: dict[str, float]) -> None:
    floor = totals["floor_us"]
    parts = [
        f"{label} {totals[key]:.0f} us ({totals[key] / floor:.2f}x)"
        for label, key in [("cuBLAS", "us"), ("GEMV", "gemv_us"), ("best of the two", "best_us")]
    ]
    print(
        f"{shape:12} rows {rows} every linear layer of a step: floor {floor:.0f} us, "
        + ", ".join(parts)
    )


def bench_step(shape: str, rows: int, copy_gbps: float) -> list[dict]:
    """Every linear layer of one decode step of `rows` rows; prints a line per matrix and
    the step's totals."""
    results = []
    totals = dict.fromkeys(["floor_us", "us", "gemv_us", "best_us"], 0.0)
    for name, n, k in SHAPES[shape]:
        t = time_matrix(n, k, rows, copy_gbps)
        t["best_us"] = min(t["us"], t["gemv_us"])
        count = 1 if name == "lm_head" else LAYERS[shape]
        for key in totals:
            totals[key] += count * t[key]
        results.append(dict(shape=shape, rows=rows, matrix=name, **t))
        print_matrix(shape, rows, name, t)
        if name == "down":
            fused = time_silu_down(n, k, rows)
            results.append(dict(shape=shape, rows=rows, matrix="silu+down", **fused))
            print(
                f"{shape:12} rows {rows} silu+down: SiLU·mul + cuBLAS {fused['us']:7.1f} us, "
                f"GEMV with SiLU·mul fused {fused['gemv_us']:7.1f} us "
                f"({fused['gemv_us'] / fused['us']:4.2f}x)"
            )
    print_step(shape, rows, totals)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    copy_gbps = measure_copy_gbps()
    print(f"device: {torch.cuda.get_device_name()}; copy {copy_gbps:.0f} GB/s (read + write)")
    results = [
        r for shape in SHAPES for rows in args.rows for r in bench_step(shape, rows, copy_gbps)
    ]
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "linear_floor.json"), "w") as f:
            json.dump({"copy_gbps": copy_gbps, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
