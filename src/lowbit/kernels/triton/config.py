"""`Config`: the launch parameters of the fused kernels (matmul.py's `_qmm_kernel`, gemv.py, swapab.py).

Kept apart from matmul.py so the kernel table (table.py), which builds Configs from its rows, and the
kernels can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Launch parameters of `_qmm_kernel`; split_k is the number of programs sharing one tile's K loop."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after_dot: bool = True
    group_m: int = 8
    split_unpack: bool = False  # VALS dots of K = block_k*bits/32 instead of one reshaped [BK, BN] tile
    gemv: bool = False  # gemv.py: no tl.dot, fp32 FMA after a magic-number dequantize (small M)
    magic: bool = False  # dot paths: codes -> fp16/bf16 by the magic-number trick instead of int->float converts
    unpack4: bool = False  # 4 bits: unpack4.py's two-codes-per-instruction unpack (inline PTX); with split_unpack
    # one dot per code position (small M), else the positions interleaved back into k order for one deep dot
    x_once: bool = False  # unpack4 with split_unpack: x loaded once per chunk, split in registers (else per position)
    # K splits meet inside the launch (splitk.py) rather than in a zeroed buffer cast afterwards (+2 launches).
    # Its ticket's release fence waits for the program's atomic adds to land, which costs where few large
    # programs share an SM (the 64x128, 8-warp tile: 0.96 vs 1.16x fp16 at M = 32, H100 r11); pick_config
    # sets it by M.
    in_kernel_reduce: bool = True
    # > 0: stream-K, a 1-D grid of stream_k programs per SM, each an equal run of the tiles x chunks steps
    # (crossing tile boundaries; split_k is then unused), so no SM idles on a partial last wave
    stream_k: int = 0
    # swapab.py: the unpacked weight as the wgmma's register operand, block_m tokens x block_n weight columns
    # (4 bits, a group per 128-deep chunk; block_k is 128); x_permuted: x reordered in torch, not in the kernel
    swap_ab: bool = False
    x_permuted: bool = False
    # > 0: ptxas register cap per thread (Triton's maxnreg; swapab.py and _qmm_kernel, not the GEMV): programs
    # per SM = 65536 registers / (cap x threads), e.g. two 8-warp swap-AB programs need <= 128, three 4-warp
    # unpack4 programs <= 168 (uncapped it takes 218: two, H200 ncu 2026-11-30)
    max_registers: int = 0
