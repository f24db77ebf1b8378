"""Triton kernels for quantized linears, one file per kernel family, and a float64 torch reference.

    dequant.py    Packed -> W^T [K, N] in fp16/bf16 (the W2/W3-free path for large M: dequantize + cuBLAS)
    matmul.py     fused dequantize-matmul: split-K for small M (decode), tiled GEMM for larger M
    reference.py  the float64 torch reference every kernel is tested against

`available()` says whether Triton can run here: on a CUDA device, or on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # the CPU path needs no Triton
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    """Whether a Triton kernel can run on tensors of `device`."""
    import torch

    device = torch.device(device)
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def device_guard(t):
    """`with device_guard(weight):` makes the weight's GPU current for a launch.

    Triton launches on the *current* CUDA device; a tensor on cuda:1 while cuda:0 is current would fail
    ("Pointer argument cannot be accessed from Triton") or, worse, run on the wrong stream. Every launch in
    this package runs under the device of the weight it reads. On the CPU (interpreter) it does nothing.
    """
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
