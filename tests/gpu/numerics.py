"""How far a kernel's output may sit from its reference, shared by the GPU tests."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of `out` against `ref`, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def tol(dtype: torch.dtype) -> float:
    """The relative error a kernel in `dtype` may have against a float64-accurate reference."""
    return 1e-5 if dtype == torch.float32 else 1e-2
