"""The `compressed-tensors` export, "pack-quantized" format, as vLLM and llm-compressor read it.

Per quantized linear `<name>` (W [N, K], G = K / group_size groups, which must be whole):
    <name>.weight_packed      int32 [N, ceil(K * bits / 32)]  codes packed along K (little-endian bit stream)
    <name>.weight_scale       fp16  [N, G]
    <name>.weight_zero_point  int32 [ceil(N * bits / 32), G]   asymmetric only, packed along N
    <name>.weight_shape       int64 [2] = (N, K)
compressed-tensors works with signed integers: q_signed = code - 2**(bits-1), zero_signed = zero -
2**(bits-1), and packs value + 2**(bits-1), which is exactly lowbit's unsigned code (and zero), so the
packed words are lowbit's bit stream unchanged. Symmetric schemes have zero_signed = 0 and store no zero
point. Per-channel (group_size -1) uses the "channel" strategy with G = 1.
"""

from __future__ import annotations

import torch

from ..config import Scheme
from ..quant import QuantResult
from .whole_groups import partial_group_refusal
from ..quant.pack import pack_bitstream, unpack_bitstream

NAME = "compressed-tensors"
COMPRESSED_TENSORS_VERSION = "0.20.0"  # the schema version written (the PyPI release the tests load with)


def refuse(scheme: Scheme, in_features: set[int]) -> str | None:
    if scheme.group_size == -1:
        return None
    return partial_group_refusal("compressed-tensors", scheme, in_features)


def can_hold(scheme: Scheme, out_features: int, in_features: int) -> str | None:
    return None  # the bit stream is padded to whole words along both dims


def _pack_padded(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Bit-stream pack along `dim`, zero-padding that dim to a multiple of 32 values, then keeping
    ceil(len * bits / 32) words (compressed-tensors' dense packing)."""
    length = values.shape[dim]
    padded = -(-length // 32) * 32
    if padded != length:
        pad = [0, 0] * (values.dim() - 1 - (dim % values.dim())) + [0, padded - length]
        values = torch.nn.functional.pad(values, pad)
    words = pack_bitstream(values, bits, dim)
    keep = -(-length * bits // 32)
    return words.narrow(dim, 0, keep).contiguous()


def layer_tensors(name: str, result: QuantResult, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    scheme = result.scheme
    n, k = result.codes.shape
    out = {
        f"{name}.weight_packed": _pack_padded(result.codes.to(torch.int32), scheme.bits, dim=1),  # [N, K*b/32]
        f"{name}.weight_scale": result.scale.to(torch.float16).contiguous(),  # [N, G]
        f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not scheme.sym:
        out[f"{name}.weight_zero_point"] = _pack_padded(result.zero.to(torch.int32), scheme.bits, dim=0)  # [N*b/32, G]
    if result.bias is not None:
        out[f"{name}.bias"] = result.bias.to(torch.float16)
    return out


def _unpack_padded(words: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of _pack_padded: pad the words to whole 32-value runs, unpack, keep `length` values."""
    runs_words = -(-length // 32) * bits  # words covering whole runs of 32 values
    have = words.shape[dim]
    if have < runs_words:
        pad = [0, 0] * (words.dim() - 1 - (dim % words.dim())) + [0, runs_words - have]
        words = torch.nn.functional.pad(words, pad)
    return unpack_bitstream(words, bits, dim).narrow(dim, 0, length)


def read_layer(get, name: str, scheme: Scheme, out_features: int, in_features: int) -> QuantResult:
    codes = _unpack_padded(get(f"{name}.weight_packed"), scheme.bits, 1, in_features)  # [N, K]
    scale = get(f"{name}.weight_scale").float()  # [N, G]
    if scheme.sym:
        zeros = torch.full(scale.shape, 2 ** (scheme.bits - 1), dtype=torch.int32)
    else:
        zeros = _unpack_padded(get(f"{name}.weight_zero_point"), scheme.bits, 0, out_features)
    return QuantResult(scheme, codes.to(torch.uint8), scale, zeros.to(torch.uint8))


def zero_offset(scheme: Scheme) -> int:
    return 0


def quantization_config(scheme: Scheme, blocks: str, kept_fp: list[str], method: dict, version: str, fp_modules: list[str] = ()) -> dict:
    """`ignore` lists every linear kept in full precision by name (lm_head unless quantized, routers, vision /
    audio towers, projectors): vLLM and compressed-tensors match ignore entries against layer names, and
    `targets: Linear` would otherwise claim them."""
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.sym,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(kept_fp),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
        "quantizer": f"lowbit {version}",
    }


def extra_files(folder, config: dict) -> None:
    """compressed-tensors needs nothing beside config.json."""
