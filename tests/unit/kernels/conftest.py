"""Where the kernel tests run: the GPU when there is one (no interpreter), else the CPU under
TRITON_INTERPRET=1 (CI), else they are skipped."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available() and not INTERPRET:
        return "cuda"
    return "cpu" if INTERPRET else None


@pytest.fixture
def device():
    dev = kernel_device()
    if dev is None:
        pytest.skip("needs Triton and a GPU, or TRITON_INTERPRET=1")
    return dev
