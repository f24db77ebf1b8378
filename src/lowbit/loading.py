"""lowbit.load: open a quantized export (ours or a compatible auto_round/GPTQ-layout checkpoint) as a
transformers model whose quantized linears are QuantLinear modules.

The model is built on `meta`, the linears that have a `.qweight` tensor in the checkpoint are swapped for
QuantLinear, and accelerate streams the tensors onto the devices of `device_map` (None: everything on
the CPU; "auto": spread over the GPUs by free memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch

from .errors import LowbitError
from .kernels.linear import QuantLinear
from .model.checkpoint import Checkpoint
from .model.skeleton import build_skeleton

# packing_format -> stored zero offset (GPTQ v1 stores zero - 1)
ZERO_OFFSETS = {"auto_round": 0, "auto_round:auto_gptq": 1, "auto_gptq": 1}


def read_quantization_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        raise LowbitError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)", "quantize it first with `lowbit quantize`")
    return qc


def zero_offset_for(qc: dict) -> int:
    method = qc.get("quant_method")
    if method == "gptq":
        return 1
    if method == "auto-round":
        fmt = qc.get("packing_format", "auto_round:auto_gptq")
        if fmt in ZERO_OFFSETS:
            return ZERO_OFFSETS[fmt]
        raise LowbitError(f"unsupported auto-round packing_format {fmt!r}", f"lowbit reads {', '.join(ZERO_OFFSETS)}")
    raise LowbitError(f"unsupported quant_method {method!r}", "lowbit loads auto-round and gptq checkpoints")


def layer_scheme(qc: dict, name: str) -> tuple[int, int]:
    """(bits, group_size) of one layer: extra_config overrides the global setting."""
    extra = (qc.get("extra_config") or {}).get(name, {})
    return int(extra.get("bits", qc["bits"])), int(extra.get("group_size", qc["group_size"]))


def cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast full-precision tensors to `dtype` in place; QuantLinear scales stay fp16 as the format defines."""
    for module in model.modules():
        skip = ("scales",) if isinstance(module, QuantLinear) else ()
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_floating_point() and name not in skip and t.dtype != dtype:
                t.data = t.data.to(dtype)


def load(path: str | Path, device_map=None, dtype: torch.dtype | None = None, max_memory: dict | None = None):
    """Load a quantized folder. Returns a transformers model in eval mode.

    Args:
        path: output folder of `lowbit quantize` (or another auto_round / gptq export).
        device_map: None (CPU), "auto", a device string, or an accelerate device map dict.
        dtype: activation dtype; default float32 on the CPU, float16 on GPUs.
        max_memory: with device_map="auto", the most memory per device (accelerate's form, e.g.
            {0: "2GiB", 1: "2GiB", "cpu": "30GiB"}); None lets accelerate use what is free.
    """
    path = Path(path)
    ckpt = Checkpoint(path)
    qc = read_quantization_config(path)
    offset = zero_offset_for(qc)
    on_gpu = device_map not in (None, "cpu") and torch.cuda.is_available()
    dtype = dtype or (torch.float16 if on_gpu else torch.float32)
    config = ckpt.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we install our own modules; transformers must not
    model = build_skeleton(config, dtype=dtype)
    quantized = sorted(n[: -len(".qweight")] for n in ckpt.index if n.endswith(".qweight"))
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bits, group_size = layer_scheme(qc, name)
        with init_empty_weights(include_buffers=True):
            layer = QuantLinear(old.in_features, old.out_features, bits, group_size, bias=old.bias is not None, zero_offset=offset, dtype=dtype)
        setattr(parent, child, layer)
    ckpt.close()
    if device_map is None:
        device_map = {"": "cpu"}
    elif isinstance(device_map, (str, torch.device)) and device_map != "auto":
        device_map = {"": str(device_map)}
    no_split = getattr(model, "_no_split_modules", None) or []
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, str(path), device_map=device_map, max_memory=max_memory, no_split_module_classes=no_split)
    cast_floats(model, dtype)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_load()  # the kernels' internal layout, built once on the layer's device
    model.lowbit_quantization_config = qc
    return model.eval()
