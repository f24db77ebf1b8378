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

from ..arch import ArchSpec
from ..errors import LowbitError
from .checkpoint import Checkpoint


def model_class(config):
    name = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise LowbitError(f"transformers {transformers.__version__} has no model class {name!r}", "upgrade transformers or check config.json's architectures")
    return cls


def build_skeleton(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The full model with every parameter on `meta` and real buffers; eval mode."""
    with init_empty_weights(include_buffers=False):
        model = model_class(config)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LowbitError(f"module {path!r} not found in {type(model).__name__}", "the architecture spec does not match this model") from None


def checkpoint_name(ckpt: Checkpoint, name: str, spec: ArchSpec) -> str:
    """The checkpoint key for a model parameter; a tied lm_head reads the embedding."""
    if ckpt.has(name):
        return name
    if name == f"{spec.lm_head}.weight" and getattr(ckpt.config, "tie_word_embeddings", False):
        return f"{spec.embed}.weight"
    # transformers may root a text model differently from its checkpoint (e.g. "model." prefixes)
    for alt in (name.removeprefix("model."), "model." + name):
        if ckpt.has(alt):
            return alt
    return name  # Checkpoint.tensor raises a clear error for it


def load_module(model, path: str, ckpt: Checkpoint, spec: ArchSpec, device, dtype: torch.dtype) -> torch.nn.Module:
    """Materialize the parameters (and persistent meta buffers) of `model.<path>` from the checkpoint."""
    module = submodule(model, path)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.device.type != "meta":
            continue
        full = f"{path}.{name}" if path else name
        value = ckpt.tensor(checkpoint_name(ckpt, full, spec))
        if value.is_floating_point():
            value = value.to(dtype)
        if tuple(value.shape) != tuple(tensor.shape):
            raise LowbitError(f"tensor {full} has shape {tuple(value.shape)} in the checkpoint but {tuple(tensor.shape)} in the model", "config.json does not match the weights")
        set_module_tensor_to_device(model, full, device, value=value)
    return module


def free_module(module: torch.nn.Module) -> None:
    """Send a module's tensors back to `meta`, releasing their memory."""
    module.to("meta")
