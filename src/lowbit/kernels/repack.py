"""The one internal layout the fast kernels read, and the repacks that build it from checkpoint layouts.

Internal layout `Packed` for W [N=out, K=in], G = ceil(K / group_size) groups (the last may be partial):
    qweight  int32 [K * bits / 32, N]  codes packed along K as a little-endian bit stream: for 4 bits,
                                       code k of a column sits in word k // 8 at bits 4 * (k % 8).
                                       This is exactly GPTQ / auto_round's qweight, so those checkpoints
                                       share the tensor (no copy); AWQ's is repacked into it.
    scales   fp16  [G, N]              as in the checkpoint
    zeros    fp16  [G, N]              zero points unpacked, stored offset undone (exact: integers < 256)
Dequant: W[n, k] = scales[k // group_size, n] * (code[k, n] - zeros[k // group_size, n]).

Why this layout: a [BLOCK_K * bits / 32, BLOCK_N] tile of qweight is a set of rows contiguous along N, so a
warp reads whole 128-byte lines with 16-byte loads, and the shifts that unpack a word give consecutive k
(what tl.dot wants along its reduction axis). Zeros unpacked to fp16 cost 2 bytes per group and column
(+3% bytes at 4 bits, group 128) and save a shift-and-mask per group in the kernel's inner loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..export.auto_awq import unpack_columns
from ..quant.pack import pack_bitstream, unpack_bitstream


@dataclass
class Packed:
    qweight: torch.Tensor  # int32 [K * bits / 32, N]
    scales: torch.Tensor  # fp16 [G, N]
    zeros: torch.Tensor  # fp16 [G, N]
    bits: int
    group_size: int  # never -1 here: per-channel is group_size == K

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return self.qweight.shape[1], self.qweight.shape[0] * 32 // self.bits


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, zero_offset: int) -> Packed:
    """auto_round / GPTQ tensors -> Packed. qweight is shared, not copied; only the zeros are unpacked."""
    zeros = unpack_bitstream(qzeros, bits, dim=1) + zero_offset  # int32 [G, N]
    return Packed(qweight, scales, zeros.to(torch.float16), bits, group_size)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Packed:
    """AutoAWQ GEMM tensors (4 bits: qweight int32 [K, N/8], qzeros int32 [G, N/8], scales fp16 [G, N]) -> Packed.

    The interleaved nibbles are read by the exporter's own unpacker (export/auto_awq.py), so lowbit has one
    AWQ packer; it runs on the CPU (it builds its shifts there), once per layer at load."""
    codes_kn = unpack_columns(qweight.cpu()).to(qweight.device)  # [K, N]
    zeros = unpack_columns(qzeros.cpu()).to(qzeros.device)  # [G, N], AWQ stores zeros as is
    return Packed(pack_bitstream(codes_kn, 4, dim=0), scales, zeros.to(torch.float16), 4, group_size)


@dataclass
class Stacked:
    """Many experts' packed weights for one projection, side by side (kernels/moe.py builds it at load; the
    grouped MoE kernel, triton/moe.py, reads it). E experts, each weight W_e [N = P * NP, K] made of P parts
    (gate and up: P = 2; down: P = 1), each part a `Packed` of [NP, K]:
        qweight  int32 [E, P, K * bits / 32, NP]
        scales   fp16  [E, P, G, NP]
        zeros    fp16  [E, P, G, NP]
        bias     act.  [E, P, NP] or None
    Each expert's part [e, p] is contiguous and is exactly one per-expert QuantLinear's buffer (those become
    views of these, so nothing is held twice). Part p owns output columns [p * NP, (p + 1) * NP) of W_e, or,
    interleaved (gpt-oss), columns p, P + p, 2P + p, ...: the kernel writes them where the layout puts them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(E, P, NP, K)."""
        e, p, kw, np_ = self.qweight.shape
        return e, p, np_, kw * 32 // self.bits
