"""Bit packing shared by the GPTQ / auto_round int32 layouts.

All of them store integer codes as a little-endian *bit stream* along one dimension: value i of a run
occupies bits [i*bits, (i+1)*bits) of the stream, and stream bit j lives in int32 word j // 32 at bit
j % 32. For 2, 4 and 8 bits no value straddles two words (word w holds values w*32/bits ...); for 3 bits
32 values fill exactly 3 words and values 10 and 21 straddle a word boundary, which is GPTQ's and
auto-round's 3-bit layout. One function therefore covers every width.

    qweight = pack_bitstream(codes.T, bits, dim=0)   # codes [N, K] -> int32 [K*bits/32, N]
    qzeros  = pack_bitstream(zeros,   bits, dim=1)   # zeros [G, N] -> int32 [G, N*bits/32]
"""

from __future__ import annotations

import torch


def packable(length: int, bits: int) -> bool:
    """Whether `length` values of `bits` fill whole int32 words (K*bits % 32 == 0, in runs of 32)."""
    return length % 32 == 0 if 32 % bits else (length * bits) % 32 == 0


def pack_bitstream(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along `dim` into int32 words; that dim shrinks by 32/bits."""
    if not packable(values.shape[dim], bits):
        raise ValueError(f"{values.shape[dim]} values of {bits} bits do not fill whole int32 words")
    v = values.movedim(dim, -1).to(torch.int64) & ((1 << bits) - 1)
    *lead, length = v.shape
    n_words = length * bits // 32
    if 32 % bits == 0:  # 2 / 4 / 8 bits: each word's values in disjoint bit fields, so their sum is their OR
        # a few kernels per tensor, not two per value position: a MoE block packs hundreds of linears
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)  # [32 / bits]
        words = (v.reshape(*lead, n_words, 32 // bits) << shifts).sum(-1)  # [..., n_words] in [0, 2**32)
        return (words - (words >= 2**31) * 2**32).to(torch.int32).movedim(-1, dim).contiguous()
    words = torch.zeros(*lead, n_words, dtype=torch.int64, device=v.device)
    # A run is the smallest stretch that fills whole words: 32 values in `bits` words for 3 bits, 32/bits
    # values in one word for 2/4/8 bits. Vectorise over runs, loop over the positions inside one run.
    per_run = 32 if 32 % bits else 32 // bits
    words_per_run = bits if 32 % bits else 1
    for i in range(per_run):
        offset = i * bits
        word, shift = offset // 32, offset % 32
        column = v[..., i::per_run]  # [..., runs]
        words[..., word::words_per_run] |= (column << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles into the next word
            words[..., word + 1 :: words_per_run] |= column >> (32 - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_bitstream(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bitstream: int32 words -> int32 values in [0, 2**bits) along `dim`."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    *lead, n_words = w.shape
    length = n_words * 32 // bits
    per_run = 32 if 32 % bits else 32 // bits
    words_per_run = bits if 32 % bits else 1
    out = torch.empty(*lead, length, dtype=torch.int64, device=w.device)
    mask = (1 << bits) - 1
    for i in range(per_run):
        offset = i * bits
        word, shift = offset // 32, offset % 32
        value = w[..., word::words_per_run] >> shift
        if shift + bits > 32:
            value = value | (w[..., word + 1 :: words_per_run] << (32 - shift))
        out[..., i::per_run] = value & mask
    return out.to(torch.int32).movedim(-1, dim).contiguous()
