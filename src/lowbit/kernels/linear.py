"""QuantLinear: a drop-in nn.Linear holding the auto_round / GPTQ int32 layout.

Buffers (W [N, K], G groups): qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32],
scales fp16 [G, N], optional bias [N]. `zero_offset` is 1 for GPTQ-v1 style checkpoints (stored
zero = zero - 1) and 0 otherwise.

forward() picks the compute path by device: on CUDA (2, 4 or 8 bits, Triton installed) the fused Triton
kernels through the `lowbit::quant_linear` custom op, which reads the internal layout of repack.py; on the
CPU (and for 3 bits) it dequantizes with torch and calls F.linear. `post_load()` builds the internal
layout once (the zeros unpacked into the non-persistent buffer `zeros_fast`; qweight and scales are
shared as they are); lowbit.load() calls it, and forward() calls it on first use otherwise (call it
yourself before torch.compile: a compiled forward must not create buffers). After changing qweight,
qzeros or scales in place, call post_load() again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.pack import unpack_bitstream
from .repack import Packed, from_gptq
from .triton import HAVE_TRITON

if HAVE_TRITON:
    from . import ops  # registers torch.ops.lowbit.*

class QuantLinear(torch.nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        zero_offset: int = 0,
        dtype: torch.dtype = torch.float16,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        self.zero_offset = zero_offset
        groups = -(-in_features // self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self.register_buffer("zeros_fast", None, persistent=False)  # fp16 [G, N], built by post_load()
        # CPU path: keep the dequantized weight between calls (trades one fp copy of W for not unpacking on
        # every forward; lowbit.load turns it on for CPU placements). None = off; else (dtype, tensor).
        self.cache_dequantized = False
        self._dequantized: tuple | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    def codes(self) -> torch.Tensor:
        """Integer codes, int32 [K, N]."""
        return unpack_bitstream(self.qweight, self.bits, dim=0)

    def zeros(self) -> torch.Tensor:
        """Zero points, int32 [G, N] (stored offset undone)."""
        return unpack_bitstream(self.qzeros, self.bits, dim=1) + self.zero_offset

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat [N, K] = scale * (q - zero), in `dtype` (default: the scales' dtype)."""
        k = self.in_features
        scales = self.scales.float().repeat_interleave(self.group_size, dim=0)[:k]  # [K, N]
        zeros = self.zeros().float().repeat_interleave(self.group_size, dim=0)[:k]  # [K, N]
        w = (self.codes().float() - zeros) * scales  # [K, N]
        return w.t().to(dtype or self.scales.dtype)

    def post_load(self) -> None:
        """Build the kernels' internal layout from the checkpoint buffers (once, after loading)."""
        self.zeros_fast = from_gptq(self.qweight, self.qzeros, self.scales, self.bits, self.group_size, self.zero_offset).zeros

    def packed(self) -> Packed:
        """The internal layout (repack.py) the Triton kernels read."""
        if self.zeros_fast is None or self.zeros_fast.device != self.qweight.device:
            self.post_load()
        return Packed(self.qweight, self.scales, self.zeros_fast, self.bits, self.group_size)

    def uses_triton(self, x: torch.Tensor) -> bool:
        return HAVE_TRITON and x.is_cuda and self.bits in (2, 4, 8) and x.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_triton(x):
            if self.zeros_fast is None:
                self.post_load()
            return ops.quant_linear(x, self.qweight, self.scales, self.zeros_fast, self.bias, self.bits, self.group_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.cache_dequantized:
            return F.linear(x, self.dequantize_weight(x.dtype), bias)
        if self._dequantized is None or self._dequantized[0] != x.dtype:
            self._dequantized = (x.dtype, self.dequantize_weight(x.dtype))
        return F.linear(x, self._dequantized[1], bias)
