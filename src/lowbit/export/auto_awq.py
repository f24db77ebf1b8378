"""The `auto_awq` export: AutoAWQ "GEMM" checkpoints (quant_method "awq", version "gemm").

Per quantized linear `<name>` (W [N, K], G = K / group_size, which must be whole):
    <name>.qweight  int32 [K, N / 8]   eight 4-bit codes of consecutive output columns per word, in
                                       AWQ's interleaved order: nibble i holds column 8c + ORDER[i]
    <name>.qzeros   int32 [G, N / 8]   zero points (stored as is), packed the same way
    <name>.scales   fp16  [G, N]
    <name>.bias     fp16  [N]
AWQ's format holds 4-bit asymmetric groups that divide in_features; anything else is refused before work
starts, naming the format that can hold it.
"""

from __future__ import annotations

import torch

from ..config import Scheme
from ..quant import QuantResult
from .whole_groups import partial_group_refusal

NAME = "auto_awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8-column run


def refuse(scheme: Scheme, in_features: set[int]) -> str | None:
    if scheme.bits != 4:
        return f"auto_awq holds only 4-bit weights, not {scheme.bits}-bit; use --format auto_round or auto_gptq"
    if scheme.sym:
        return "auto_awq holds only asymmetric (zero-point) groups; pass --asym, or use --format auto_round or auto_gptq for sym"
    if scheme.group_size == -1:
        return "auto_awq needs a positive group size; pass --group_size 128, or use --format auto_round for per-channel"
    return partial_group_refusal("auto_awq", scheme, in_features)


def can_hold(scheme: Scheme, out_features: int, in_features: int) -> str | None:
    if out_features % 8:
        return f"out_features={out_features} is not a multiple of 8 (AWQ packs 8 columns per int32)"
    return None


def zero_offset(scheme: Scheme) -> int:
    return 0


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, N] 4-bit values -> int32 [R, N/8] in AWQ's interleaved nibble order."""
    r, n = values.shape
    runs = values.to(torch.int64).reshape(r, n // 8, 8)[..., list(ORDER)]  # [R, N/8, 8]: nibble i <- column ORDER[i]
    words = (runs << (4 * torch.arange(8, device=values.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int32 [R, N] (inverse of pack_columns)."""
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, device=words.device))) & 0xF  # [R, N/8, 8]
    out = torch.empty_like(nibbles)
    out[..., list(ORDER)] = nibbles
    return out.reshape(words.shape[0], -1).to(torch.int32)


def layer_tensors(name: str, result: QuantResult, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.qweight": pack_columns(result.codes.t()),  # codes [K, N]
        f"{name}.qzeros": pack_columns(result.zero.t()),  # zeros [G, N]
        f"{name}.scales": result.scale.t().to(torch.float16).contiguous(),
    }
    if result.bias is not None:
        out[f"{name}.bias"] = result.bias.to(torch.float16)
    return out


def read_layer(get, name: str, scheme: Scheme, out_features: int, in_features: int) -> QuantResult:
    codes = unpack_columns(get(f"{name}.qweight")).t()  # [N, K]
    zeros = unpack_columns(get(f"{name}.qzeros")).t()  # [N, G]
    return QuantResult(scheme, codes.to(torch.uint8), get(f"{name}.scales").t().float(), zeros.to(torch.uint8))


def quantization_config(scheme: Scheme, blocks: str, kept_fp: list[str], method: dict, version: str, fp_modules: list[str] = ()) -> dict:
    """modules_to_not_convert: transformers / GPTQModel skip every module whose name contains one of these
    strings: the kept linears and the kept sub-models (vision tower, projector)."""
    return {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "modules_to_not_convert": [*kept_fp, *fp_modules] or None,
        "quantizer": f"lowbit {version}",
    }


def extra_files(folder, config: dict) -> None:
    """AWQ needs nothing beside config.json."""
