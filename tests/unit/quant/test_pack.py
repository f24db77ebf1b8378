"""The int32 bit-stream layout, pinned against hand-computed words and auto-round's own packer."""

import pytest
import torch

from lowbit.quant.pack import pack_bitstream, packable, unpack_bitstream


def test_four_bit_word_holds_eight_values_low_nibble_first():
    codes = torch.arange(1, 9).reshape(8, 1)  # K=8 values of one column
    word = pack_bitstream(codes, 4, dim=0)
    assert word.shape == (1, 1)
    assert word.item() == 0x87654321 - 2**32  # value k at bits 4k; stored as signed int32


def test_two_and_eight_bit_words():
    assert pack_bitstream(torch.tensor([[3], [0], [1], [2]] + [[0]] * 12), 2, 0).item() == 0b10_01_00_11
    assert pack_bitstream(torch.tensor([[0x11], [0x22], [0x33], [0x44]]), 8, 0).item() == 0x44332211


def test_three_bit_values_straddle_words_like_gptq():
    # 32 values fill 3 words; value 10 sits at stream bits 30..32, i.e. two bits in word 0, one in word 1
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111
    words = pack_bitstream(codes, 3, 0).flatten().tolist()
    assert words == [-(2**31) + 2**30, 1, 0]  # bits 30 and 31 of word 0, bit 0 of word 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_roundtrip(bits, dim):
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 96))
    packed = pack_bitstream(values, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == values.shape[dim] * bits // 32
    assert torch.equal(unpack_bitstream(packed, bits, dim), values.int())


def test_unpackable_length_is_refused():
    assert not packable(20, 3) and packable(32, 3) and packable(8, 4) and not packable(6, 4)
    with pytest.raises(ValueError, match="do not fill whole int32 words"):
        pack_bitstream(torch.zeros(6, 1), 4, 0)


@pytest.mark.interop
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_auto_round_packer(bits):
    ref = pytest.importorskip("auto_round.utils.bit_packing")
    values = torch.randint(0, 2**bits, (96, 64), dtype=torch.int32)
    assert torch.equal(pack_bitstream(values, bits, 0), ref.pack_bitstream(values, bits, dim=0))
    assert torch.equal(pack_bitstream(values, bits, 1), ref.pack_bitstream(values, bits, dim=1))
