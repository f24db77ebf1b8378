"""The `auto_round` export, as the auto-round package and transformers' auto-round integration read it.

Per quantized linear `<name>` (W [N, K], G = ceil(K / group_size) groups, the last possibly partial):
    <name>.qweight  int32 [K * bits / 32, N]   codes packed along K as a little-endian bit stream
    <name>.qzeros   int32 [G, N * bits / 32]   zero points packed along N the same way
    <name>.scales   fp16  [G, N]
    <name>.bias     fp16  [N]                  only if the layer has a bias
No g_idx: the group of input k is k // group_size.

Zero points: asymmetric schemes use packing_format "auto_round" and store the zero as is;
symmetric ones use "auto_round:auto_gptq", GPTQ's v1 convention of storing zero - 1 (auto-round's own
export switches the same way, so that its loaders pick the matching kernel).

config.json gets `quantization_config` with quant_method "auto-round"; linears inside the quantized
blocks that were kept in full precision are listed in `extra_config` with bits 16.
"""

from __future__ import annotations

import torch

from ..config import Scheme
from ..quant import QuantResult
from ..quant.pack import pack_bitstream, packable, unpack_bitstream

NAME = "auto_round"
QUANT_METHOD = "auto-round"


def refuse(scheme: Scheme, in_features: set[int]) -> str | None:
    """None: auto_round holds every bits / group size / symmetry lowbit makes (partial groups included)."""
    return None


def packing_format(scheme: Scheme) -> str:
    return "auto_round:auto_gptq" if scheme.sym else "auto_round"


def zero_offset(scheme: Scheme) -> int:
    return 1 if scheme.sym else 0


def can_hold(scheme: Scheme, out_features: int, in_features: int) -> str | None:
    """None when the layer fits the layout, else why it does not (the layer then stays in fp)."""
    bits = scheme.bits
    if not packable(in_features, bits):
        return f"in_features={in_features} does not pack into int32 words at {bits} bits"
    if not packable(out_features, bits):
        return f"out_features={out_features} does not pack into int32 words at {bits} bits"
    return None


def layer_tensors(name: str, result: QuantResult, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    scheme = result.scheme
    codes_kn = result.codes.t()  # [K, N]
    zeros_gn = result.zero.t().to(torch.int32) - zero_offset(scheme)  # [G, N]
    out = {
        f"{name}.qweight": pack_bitstream(codes_kn, scheme.bits, dim=0),
        f"{name}.qzeros": pack_bitstream(zeros_gn, scheme.bits, dim=1),
        f"{name}.scales": result.scale.t().to(torch.float16).contiguous(),
    }
    if result.bias is not None:
        out[f"{name}.bias"] = result.bias.to(torch.float16)
    return out


def read_layer(get, name: str, scheme: Scheme, out_features: int, in_features: int) -> QuantResult:
    """Inverse of layer_tensors; `get(tensor_name)` reads one tensor."""
    codes = unpack_bitstream(get(f"{name}.qweight"), scheme.bits, 0).t()  # [N, K]
    zeros = unpack_bitstream(get(f"{name}.qzeros"), scheme.bits, 1).t() + zero_offset(scheme)  # [N, G]
    return QuantResult(scheme, codes.to(torch.uint8), get(f"{name}.scales").t().float(), zeros.to(torch.uint8))


def extra_files(folder, config: dict) -> None:
    """auto_round needs nothing beside config.json."""


def quantization_config(scheme: Scheme, blocks: str, kept_fp: list[str], method: dict, version: str, fp_modules: list[str] = ()) -> dict:
    """kept_fp: every linear left in full precision, by name (listed in extra_config with 16 bits, so
    auto-round's loader leaves them as nn.Linear); only layers inside `blocks` are converted at all."""
    config = {
        "quant_method": QUANT_METHOD,
        "packing_format": packing_format(scheme),
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "data_type": "int",
        "act_bits": 16,
        "block_name_to_quantize": blocks,
        "quantizer": f"lowbit {version}",
        **{k: v for k, v in method.items() if k in ("iters", "nsamples", "seqlen", "lr", "minmax_lr", "batch_size")},
    }
    if kept_fp:
        config["extra_config"] = {name: {"bits": 16, "data_type": "float"} for name in kept_fp}
    return config
