"""Large M: dequantize + cuBLAS, in column slabs so the fp16 weight need not make a round trip through DRAM.

At M >= 1024 a W4 matmul is compute bound and cuBLAS' fp16 GEMM is the fastest way to run it, but it needs
the weight in fp16. Dequantizing the whole of W^T [K, N] first writes 2*K*N bytes to DRAM and reads them
back (8192x28672: 940 MB of extra traffic, ~0.28 ms on an H100, against ~0.6 ms for the GEMM at M = 1024).

Here W^T is dequantized `slab_n` columns at a time into a reused buffer ([K, slab_n], sized to stay in L2,
e.g. 8192x2048 fp16 = 32 MB against the H100's 50 MB) and each slab is multiplied right away:
    out[:, n0:n0+nb] = x [M, K] @ W^T[:, n0:n0+nb]
cuBLAS writes straight into the column slice of `out` (row stride N). With `overlap`, slab i+1 is
dequantized on a side stream while slab i multiplies (two buffers, events keep a buffer from being
overwritten before its GEMM has read it); the memory-bound dequantize then fills the SMs the GEMM's last
wave leaves idle. Both work under CUDA-graph capture (the side stream forks from and joins the current one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..repack import Packed
from .dequant import dequantize


@dataclass(frozen=True)
class DequantGemm:
    """pick_config's answer for large M: dequantize + cuBLAS, whole (slab_n = 0) or in column slabs."""

    slab_n: int = 0
    overlap: bool = False


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def dequant_gemm(x: torch.Tensor, p: Packed, bias: torch.Tensor | None, out: torch.Tensor, plan: DequantGemm) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequant(p) (+ bias); x, out in fp16/bf16 on p's device (checked by the caller)."""
    n, k = p.shape
    if plan.slab_n <= 0 or plan.slab_n >= n:
        w = dequantize(p, x.dtype)  # [K, N]
        return torch.mm(x, w, out=out) if bias is None else torch.addmm(bias.to(x.dtype), x, w, out=out)
    slabs = [(n0, min(plan.slab_n, n - n0)) for n0 in range(0, n, plan.slab_n)]
    overlap = plan.overlap and x.is_cuda and len(slabs) > 1
    if not overlap:
        buf = torch.empty(k * plan.slab_n, dtype=x.dtype, device=x.device)
        for n0, nb in slabs:
            _slab_mm(x, p, bias, out, buf, n0, nb)
        return out

    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    # Every call starts with the side stream waiting for the main one, so the buffers, allocated from the
    # side stream's pool and freed on return, are reused by a later call only after this call's GEMMs (queued
    # on main) have read them; no record_stream needed, which also keeps this capturable.
    side.wait_stream(main)  # x, the weight and out are ready
    with torch.cuda.stream(side):
        bufs = [torch.empty(k * plan.slab_n, dtype=x.dtype, device=x.device) for _ in range(2)]
    ready = [torch.cuda.Event() for _ in slabs]  # slab i dequantized
    done = [torch.cuda.Event() for _ in slabs]  # slab i's GEMM has read its buffer
    for i, (n0, nb) in enumerate(slabs):
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(done[i - 2])  # the buffer's previous slab is consumed
            w = bufs[i % 2][: k * nb].view(k, nb)
            dequantize(p, x.dtype, out=w, cols=(n0, nb))
            ready[i].record(side)
        main.wait_event(ready[i])
        _mm_into(x, w, bias, out, n0, nb)
        done[i].record(main)
    main.wait_stream(side)  # join (needed to end a graph capture; a no-op cost otherwise)
    return out


def _slab_mm(x, p, bias, out, buf, n0: int, nb: int) -> None:
    k = x.shape[1]
    w = buf[: k * nb].view(k, nb)
    dequantize(p, x.dtype, out=w, cols=(n0, nb))
    _mm_into(x, w, bias, out, n0, nb)


def _mm_into(x, w, bias, out, n0: int, nb: int) -> None:
    """out[:, n0:n0+nb] = x @ w (+ bias slice); cuBLAS writes the strided column slice in place."""
    dst = out[:, n0 : n0 + nb]
    if bias is None:
        torch.mm(x, w, out=dst)
    else:
        torch.addmm(bias[n0 : n0 + nb].to(x.dtype), x, w, out=dst)
