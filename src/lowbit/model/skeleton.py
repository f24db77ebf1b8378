"""A model skeleton whose parameters live on `meta`, filled one module at a time from a Checkpoint.

`init_empty_weights(include_buffers=False)` (accelerate) keeps computed buffers such as rotary tables
real, so only weights have to be streamed in. Loading a module copies exactly its tensors to the target
device; freeing sends them back to `meta`, so peak memory is one block plus what is explicitly loaded.
"""

from __future__ import annotations

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from ..arch.experts import unfuse_experts
from ..errors import LowbitError
from .checkpoint import Checkpoint


def model_class(config):
    name = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise LowbitError(f"transformers {transformers.__version__} has no model class {name!r}", "upgrade transformers or check config.json's architectures")
    return cls


def attention_implementation(cls) -> str:
    """sdpa where the class supports it (most), else eager (gpt-oss: attention sinks)."""
    return "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"


def build_skeleton(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The full model with every parameter on `meta` and real buffers; eval mode. Fused mixture-of-experts
    parameters are unfused into one linear per expert projection (arch/experts.py)."""
    with init_empty_weights(include_buffers=False):
        cls = model_class(config)
        model = cls._from_config(config, dtype=dtype, attn_implementation=attention_implementation(cls))
    model.tie_weights()  # tied parameters (lm_head and the embedding) become one Parameter, as when loaded
    unfuse_experts(model)
    return model.eval()


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LowbitError(f"module {path!r} not found in {type(model).__name__}", "the architecture spec does not match this model") from None


def load_tensors(model, full_names, ckpt: Checkpoint, names, device, dtype: torch.dtype) -> None:
    """Materialize these parameters / buffers of `model` from the checkpoint.

    `names` (model/names.py) maps model names to checkpoint keys. Buffers that the checkpoint holds are
    loaded even though the skeleton built them real (Gemma 4's per-layer `layer_scalar` is a persistent
    buffer initialised to 1 whose trained value lives in the checkpoint); computed ones (rotary tables)
    are not in it and stay as built. `device` may be a function of the full name (a block placed over
    several devices: placement.Placement.device_of)."""
    where = device if callable(device) else (lambda _: device)
    for full, tensor in full_names:
        device = where(full)
        if not names.has(full):
            if tensor.device.type == "meta":
                raise LowbitError(f"tensor {full} is missing from the checkpoint at {ckpt.path}", "the checkpoint is incomplete or for another architecture")
            if tensor.device != torch.device(device):  # a computed buffer (rotary table): where the module runs
                set_module_tensor_to_device(model, full, device)
            continue
        value = names.read(ckpt, full)
        if value.is_floating_point():
            value = value.to(dtype)
        if tuple(value.shape) != tuple(tensor.shape):
            raise LowbitError(f"tensor {full} has shape {tuple(value.shape)} in the checkpoint but {tuple(tensor.shape)} in the model", "config.json does not match the weights")
        set_module_tensor_to_device(model, full, device, value=value)


def load_module(model, path: str, ckpt: Checkpoint, names, device, dtype: torch.dtype) -> torch.nn.Module:
    """Materialize the parameters and checkpointed buffers of `model.<path>` (see load_tensors)."""
    module = submodule(model, path)
    prefix = f"{path}." if path else ""
    load_tensors(model, [(prefix + n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())], ckpt, names, device, dtype)
    return module


def free_tensors(model, full_names) -> None:
    """Send these parameters / persistent buffers back to `meta`, releasing their memory."""
    for full in full_names:
        set_module_tensor_to_device(model, full, "meta")


def free_module(module: torch.nn.Module) -> None:
    """Send a module's parameters and persistent buffers back to `meta` (computed buffers stay)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            m._parameters[name] = torch.nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)
        for name, b in list(m.named_buffers(recurse=False)):
            if name not in m._non_persistent_buffers_set and b is not None:
                m._buffers[name] = b.to("meta")
