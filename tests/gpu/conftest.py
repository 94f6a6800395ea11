"""GPU tests: marked `gpu`, skipped where torch sees no CUDA device (CI).

With TRITON_INTERPRET=1 and Triton installed, the kernel tests also run on the CPU through
Triton's interpreter (float32 only: its bf16 dot is not faithful), for debugging without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            interpretable = INTERPRET and item.get_closest_marker("interpretable")
            if not HAS_CUDA and not interpretable:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpretable: also runs on the CPU under TRITON_INTERPRET=1"
    )


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request) -> torch.dtype:
    if request.param == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 kernels need a GPU (the interpreter's bf16 dot is not faithful)")
    return request.param
