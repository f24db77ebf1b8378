"""4-bit codes -> dot operands with two codes per instruction (PTX inline assembly, CUDA only).

The dot paths' plain unpack spends ~3 instructions per code in the loop: a shift per code position, an
AND/OR (LOP3) per code, a PRMT per pair to narrow int32 to 16 bits and a HADD2 per pair for the zero
(SASS of matmul.py's 16x128 split-unpack tile, Triton 3.6, sm_90: 768 instructions per 128 codes a
thread). Here one call takes a pair of int32 words (w0, w1: 16 codes) and returns the 8 code positions
j = 0..7 as fp16x2 / bf16x2 registers holding (q_j(w0) - z0, q_j(w1) - z1), built per byte of the words:

    t   = PRMT(w0, w1)                       byte i of w0 in bits 0-7, byte i of w1 in bits 16-23
    lo  = (t & 0x000F000F) | 0x64006400      fp16x2 (1024 + q_2i(w0), 1024 + q_2i(w1))         one LOP3
    hi  = (t & 0x00F000F0) | 0x64006400      fp16x2 (1024 + 16 q_2i+1, ...)                    one LOP3
    j = 2i:   lo * 1 + (-(1024 + z))         = q - z, exact                                    one HFMA2
    j = 2i+1: hi * 1/16 + (-(64 + z))        = q - z, exact ((1024 + 16q) / 16 = 64 + q)        one HFMA2

so 20 instructions per 16 codes (1.25 per code) and no narrowing. bf16 (7 mantissa bits) cannot hold
128 + 16q, so its high nibble is shifted down first (one SHF more per byte): 1.5 per code.

Every output lane depends only on the same lane of the inputs (w0 -> low half, w1 -> high half, zeros
paired the same way), so this is a true elementwise op whatever pairs Triton hands it (`pack=2`); it is
fastest when the pair is (row r, row r + 1) of a [R, BN] word tile, which is what the mma operand layout
(kWidth = 2) holds in one register, and that is the layout Triton gives the word tile when it feeds tl.dot.

The interpreter cannot run PTX: with ASM=False (set under TRITON_INTERPRET=1) the same values come from
plain Triton ops, so the CPU tests check the kernel around it; the GPU tests check the assembly.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _asm(bf16: bool) -> str:
    lines = ["{", ".reg .b32 t, u, lo, hi, one, sixteenth;"]
    if bf16:
        lines.append("mov.b32 one, 0x3F803F80;")  # bf16x2 (1, 1)
    else:
        lines += ["mov.b32 one, 0x3C003C00;", "mov.b32 sixteenth, 0x2C002C00;"]  # fp16x2 (1, 1), (1/16, 1/16)
    for i in range(4):  # byte i of each word: codes 2i (low nibble) and 2i + 1 (high nibble)
        sel = i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12)
        lines.append(f"prmt.b32 t, $8, $9, {sel:#06x};")
        if bf16:
            lines += [
                "lop3.b32 lo, t, 0x000F000F, 0x43004300, 0xEA;",  # (t & m) | c: bf16 128 + q
                "shr.b32 u, t, 4;",
                "lop3.b32 hi, u, 0x000F000F, 0x43004300, 0xEA;",
                f"fma.rn.bf16x2 ${2 * i}, lo, one, $10;",
                f"fma.rn.bf16x2 ${2 * i + 1}, hi, one, $10;",
            ]
        else:
            lines += [
                "lop3.b32 lo, t, 0x000F000F, 0x64006400, 0xEA;",  # fp16 1024 + q
                "lop3.b32 hi, t, 0x00F000F0, 0x64006400, 0xEA;",  # fp16 1024 + 16 q
                f"fma.rn.f16x2 ${2 * i}, lo, one, $10;",
                f"fma.rn.f16x2 ${2 * i + 1}, hi, sixteenth, $11;",
            ]
    lines.append("}")
    return "\n".join(lines)


ASM_FP16 = tl.constexpr(_asm(False))
ASM_BF16 = tl.constexpr(_asm(True))
CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r")  # 8 outputs (one fp16x2 each), w0, w1, zero pairs


@triton.jit
def _per_column(z, shape, ZERO_PER_ROW: tl.constexpr):
    """z [BN] broadcast over a word tile: along its rows ([R, BN], the default) or, with ZERO_PER_ROW, its
    columns ([BN, R], the transposed tile of swapab.py)."""
    if ZERO_PER_ROW:  # (if / else: code after a constexpr branch's return is still compiled)
        zb = tl.broadcast_to(z[:, None], shape)
    else:
        zb = tl.broadcast_to(z[None, :], shape)
    return zb


@triton.jit
def _code_minus_zero(words, z, j: tl.constexpr, DTYPE: tl.constexpr, ZERO_PER_ROW: tl.constexpr):
    return (((words >> (4 * j)) & 0xF).to(tl.float32) - _per_column(z, words.shape, ZERO_PER_ROW)).to(DTYPE)


@triton.jit
def unpack4_dot_operands(words, z, DTYPE: tl.constexpr, ASM: tl.constexpr, ZERO_PER_ROW: tl.constexpr = False):
    """int32 words [R, BN] (GPTQ order: code j of word r is k = 8r + j), zeros z fp32 [BN] (integers) ->
    8 tiles [R, BN] of DTYPE (fp16 / bf16), tile j holding q_j - z (exact). ZERO_PER_ROW: the words come
    transposed, [BN, R], z indexing their rows (the outputs are [BN, R] too). ASM=False: the same values with
    plain Triton ops (for the interpreter)."""
    if not ASM:
        return (_code_minus_zero(words, z, 0, DTYPE, ZERO_PER_ROW), _code_minus_zero(words, z, 1, DTYPE, ZERO_PER_ROW),
                _code_minus_zero(words, z, 2, DTYPE, ZERO_PER_ROW), _code_minus_zero(words, z, 3, DTYPE, ZERO_PER_ROW),
                _code_minus_zero(words, z, 4, DTYPE, ZERO_PER_ROW), _code_minus_zero(words, z, 5, DTYPE, ZERO_PER_ROW),
                _code_minus_zero(words, z, 6, DTYPE, ZERO_PER_ROW), _code_minus_zero(words, z, 7, DTYPE, ZERO_PER_ROW))
    elif DTYPE == tl.float16:
        zlo = _per_column((-(z + 1024.0)).to(tl.float16), words.shape, ZERO_PER_ROW)
        zhi = _per_column((-(z + 64.0)).to(tl.float16), words.shape, ZERO_PER_ROW)
        return tl.inline_asm_elementwise(ASM_FP16, CONSTRAINTS, [words, zlo, zhi], dtype=(tl.float16,) * 8,
                                         is_pure=True, pack=2)
    else:
        zb = _per_column((-(z + 128.0)).to(tl.bfloat16), words.shape, ZERO_PER_ROW)
        return tl.inline_asm_elementwise(ASM_BF16, CONSTRAINTS, [words, zb, zb], dtype=(tl.bfloat16,) * 8,
                                         is_pure=True, pack=2)
