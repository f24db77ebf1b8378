"""The `auto_gptq` export: GPTQ v1 checkpoints as AutoGPTQ, GPTQModel/optimum and transformers read them.

Per quantized linear `<name>` (W [N, K], G = ceil(K / group_size)):
    <name>.qweight  int32 [K * bits / 32, N]   codes packed along K (little-endian bit stream)
    <name>.qzeros   int32 [G, N * bits / 32]   zero - 1 packed along N (the v1 convention)
    <name>.scales   fp16  [G, N]
    <name>.g_idx    int32 [K]                  k // group_size (no act-order permutation is stored)
    <name>.bias     fp16  [N]
plus `quantize_config.json` and config.json `quantization_config` with quant_method "gptq",
checkpoint_format "gptq".

Only symmetric schemes: v1 stores zero - 1, so an asymmetric group whose zero point is 0 would be
written as -1 and read back as 2**bits - 1 (GPTQ's long-standing asym bug); asymmetric schemes belong in
auto_round, which stores zeros as they are.
"""

from __future__ import annotations

import json
import re

import torch

from ..config import Scheme
from ..quant import QuantResult
from . import auto_round

NAME = "auto_gptq"
can_hold = auto_round.can_hold


def refuse(scheme: Scheme, in_features: set[int]) -> str | None:
    if not scheme.sym:
        return "auto_gptq (GPTQ v1, zeros stored minus one) cannot hold asymmetric zero points; pass --sym, or use --format auto_round for asym"
    return None


def zero_offset(scheme: Scheme) -> int:
    return 1


def layer_tensors(name: str, result: QuantResult, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out = auto_round.layer_tensors(name, result)  # sym: the same zero - 1 packing ("auto_round:auto_gptq")
    k = result.codes.shape[1]
    gs = result.scheme.group_size_for(k)
    out[f"{name}.g_idx"] = torch.arange(k, dtype=torch.int32) // gs
    return out


def read_layer(get, name: str, scheme: Scheme, out_features: int, in_features: int) -> QuantResult:
    return auto_round.read_layer(get, name, scheme, out_features, in_features)  # zero_offset 1 for sym


def quantization_config(scheme: Scheme, blocks: str, kept_fp: list[str], method: dict, version: str, fp_modules: list[str] = ()) -> dict:
    """What ran goes in: desc_act / static_groups / true_sequential / damp_percent are GPTQ's own settings
    when GPTQ ran (act-order with static groups keeps the codes in natural order, g_idx = k // group_size),
    and desc_act false otherwise. Kept linears and kept sub-models are GPTQModel `dynamic` skip rules."""
    gptq_ran = method.get("method") == "gptq"
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "desc_act": bool(method.get("desc_act", False)) if gptq_ran else False,
        "static_groups": bool(method.get("static_groups", False)) if gptq_ran else False,
        "pack_dtype": "int32",
        "block_name_to_quantize": blocks,
        "quantizer": [f"lowbit:{version}"],
        "lowbit_method": method.get("method", "rtn"),
    }
    if gptq_ran:
        config.update(true_sequential=bool(method.get("true_sequential")), damp_percent=method.get("damp_percent"))
    if kept_fp or fp_modules:
        # GPTQModel's per-module skip rules: exact names, and every module under a kept sub-model
        rules = {f"-:^{re.escape(name)}$": {} for name in kept_fp}
        rules.update({f"-:^{re.escape(path)}\\.": {} for path in fp_modules})
        config["dynamic"] = rules
    return config


def extra_files(folder, config: dict) -> None:
    (folder / "quantize_config.json").write_text(json.dumps(config, indent=2))
