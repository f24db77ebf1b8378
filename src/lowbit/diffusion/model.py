"""A diffusers transformer folder (config.json + diffusion_pytorch_model*.safetensors) as lowbit's Checkpoint,
its meta skeleton, and its tensor names (diffusers checkpoints use the model's own names: no renaming)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from ..errors import LowbitError
from ..model.checkpoint import Checkpoint
from ..model.names import NameMap


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def open_transformer(path: Path) -> Checkpoint:
    return Checkpoint(path, read_config=read_config)


def transformer_class(config: dict):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise LowbitError(f"diffusers {diffusers.__version__} has no model class {name!r}", "upgrade diffusers (lowbit pins 0.42.1) or check the transformer's config.json")
    return cls


def build_transformer(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer with every parameter on `meta` (computed buffers real), in eval mode."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights(include_buffers=False):
        model = transformer_class(config).from_config(config)
    return model.to(dtype).eval()


def identity_names(model: torch.nn.Module, ckpt: Checkpoint) -> NameMap:
    state = model.state_dict(keep_vars=True)
    return NameMap({n: n for n in state if ckpt.has(n)}, [k for k in ckpt.index if k not in state])


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}


def stored_bytes(ckpt: Checkpoint) -> dict[str, int]:
    """tensor name -> bytes as stored, from the shard headers (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for file in set(ckpt.index.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                out[name] = numel * _DTYPES.get(t.get_dtype(), torch.float32).itemsize
    return out


def source_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The float dtype of the transformer's weights (diffusers configs do not record it)."""
    from safetensors import safe_open

    for name, file in ckpt.index.items():
        with safe_open(file, framework="pt") as f:
            t = f.get_slice(name)
            dtype = _DTYPES.get(t.get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return torch.float32
