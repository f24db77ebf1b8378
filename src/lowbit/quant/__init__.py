"""Quantization primitives (grid, quantize, dequantize) and bit packing."""

from .primitives import QuantResult, compute_qparams, dequantize, fake_quantize, quantize_codes, quantize_weight
from .pack import pack_bitstream, unpack_bitstream

__all__ = [
    "QuantResult",
    "compute_qparams",
    "quantize_codes",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "pack_bitstream",
    "unpack_bitstream",
]
