"""The integer grid every method shares: per-group min/max parameters, rounding, dequantization.

Shapes: a weight W is [N, K] (out_features, in_features) as nn.Linear stores it. Groups run along K:
group g covers inputs [g*gs, min((g+1)*gs, K)); when gs does not divide K the last group is partial
(SmolLM2: K=576, gs=128 -> 5 groups, the last 64 wide). Scales and zeros are [N, G].

Dequantization is W ~= scale * (q - zero) with q, zero integers in [0, 2**bits - 1]. Scales are rounded
to fp16 *before* the codes are computed, because fp16 is what every export format stores: the codes we
evaluate are then exactly the codes we write.

The functions take optional SignRound parameters (rounding offsets `v` [N, K] and min/max factors
[N, G]) and stay differentiable through straight-through rounding, so AutoRound trains through the very
same math that RTN uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Scheme

SCALE_FLOOR = 1e-5  # a group of all-equal weights would otherwise get scale 0 and divide by it


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return (x.round() - x).detach() + x


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, gs], padding the partial last group with zeros.

    Zero padding never changes a group's range: the grid always spans 0 (wmin <= 0 <= wmax).
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    if groups * gs != k:
        w = F.pad(w, (0, groups * gs - k))
    return w.reshape(n, groups, gs)


def expand_groups(p: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] per-group parameter -> [N, K] per-weight, truncating the partial last group."""
    gs = k if group_size == -1 else group_size
    return p.repeat_interleave(gs, dim=1)[:, :k]


def compute_qparams(
    w: torch.Tensor,
    scheme: Scheme,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero), both [N, G] float32; zero holds integers.

    min_scale / max_scale ([N, G], around 1.0) shrink or stretch the group's range (SignRound's min/max
    tuning); gradients flow into them through scale and (via straight-through rounding) zero.
    """
    groups = group_view(w.float(), scheme.group_size)  # [N, G, gs]
    wmin = groups.amin(dim=-1).clamp(max=0)  # [N, G]
    wmax = groups.amax(dim=-1).clamp(min=0)
    if min_scale is not None:
        wmin = wmin * min_scale
    if max_scale is not None:
        wmax = wmax * max_scale
    if scheme.sym:
        # GPTQ's symmetric grid: zero fixed mid-range, scale covers the larger magnitude.
        absmax = torch.maximum(-wmin, wmax)
        scale = 2 * absmax / scheme.maxq
        zero = torch.full_like(scale, float((scheme.maxq + 1) // 2)).detach()
    else:
        scale = (wmax - wmin) / scheme.maxq
    scale = scale.clamp(min=SCALE_FLOOR).to(torch.float16).to(torch.float32)
    if not scheme.sym:
        zero = round_ste(-wmin / scale).clamp(0, scheme.maxq)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme, v: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes q = clamp(round(W / scale + v) + zero, 0, maxq), float [N, K] (differentiable via STE)."""
    k = w.shape[1]
    s = expand_groups(scale, scheme.group_size, k)
    z = expand_groups(zero, scheme.group_size, k)
    x = w.float() / s
    if v is not None:
        x = x + v
    return (round_ste(x) + z).clamp(0, scheme.maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat = scale * (q - zero), [N, K] float32."""
    k = codes.shape[1]
    s = expand_groups(scale.float(), group_size, k)
    z = expand_groups(zero.float(), group_size, k)
    return s * (codes.float() - z)


def fake_quantize(
    w: torch.Tensor,
    scheme: Scheme,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize W on the grid, differentiable in v/min_scale/max_scale; float32 [N, K]."""
    scale, zero = compute_qparams(w, scheme, min_scale, max_scale)
    codes = quantize_codes(w, scale, zero, scheme, v)
    return dequantize(codes, scale, zero, scheme.group_size)


@dataclass
class QuantResult:
    """One quantized linear as plain data, independent of any export format.

    codes: uint8 [N, K] integers in [0, 2**bits - 1].
    scale: float32 [N, G] (fp16-representable); zero: uint8 [N, G] integers.
    bias: the layer's bias or None (kept in full precision).
    """

    scheme: Scheme
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.scheme.group_size)


ROWS_PER_CHUNK = 1024  # rows quantized at once: bounds the float32 temporaries to ~1024 x K x 4 bytes each


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor,
    scheme: Scheme,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize W [N, K] into a QuantResult (uint8 codes), a chunk of rows at a time (rows are independent)."""
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        scale, zero = compute_qparams(w[rows], scheme, pick(min_scale), pick(max_scale))
        codes.append(quantize_codes(w[rows], scale, zero, scheme, pick(v)).to(torch.uint8))
        scales.append(scale)
        zeros.append(zero.to(torch.uint8))
    return QuantResult(
        scheme=scheme,
        codes=torch.cat(codes),
        scale=torch.cat(scales),
        zero=torch.cat(zeros),
        bias=None if bias is None else bias.detach().clone(),
    )
