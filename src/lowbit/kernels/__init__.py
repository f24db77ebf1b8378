"""Quantized linear layers and their compute paths (torch dequantize on the CPU; Triton on CUDA)."""

from .linear import QuantLinear

__all__ = ["QuantLinear"]
