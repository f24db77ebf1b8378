"""The pipeline's other components (text encoders, VAE): sized from their files, loaded straight onto the
device the placement gives each, and joined with the transformer into a diffusers pipeline.

diffusers' `DiffusionPipeline.from_pretrained` builds every component on the CPU and `.to(device)` moves it
after, so a run's RAM peak was at least its largest component (FLUX's T5-XXL: ~9.5 GB in bf16). Here each
component is loaded by its own class with `device_map={"": device}` (transformers' and diffusers' meta-device
loading: every tensor read from the safetensors file and put on its device, never the whole model on the
CPU), then handed to the pipeline, which then loads only what is left (tokenizers, scheduler).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder import PipelineFolder, component_class

_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16")


def component_bytes(path: Path, dtype: torch.dtype) -> int:
    """What a component's weights take once loaded in `dtype`: from its safetensors headers (no tensor read),
    floating tensors at `dtype`'s size, the others as stored; `.bin` weights count as their file size."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                kind = t.get_dtype()
                total += numel * (dtype.itemsize if kind in _FLOATS else _DTYPES.get(kind, 4))
    return total + sum(f.stat().st_size for f in Path(path).glob("*.bin"))


def other_components(folder: PipelineFolder) -> list[str]:
    """The pipeline's torch-module components other than the transformer lowbit quantizes."""
    return [name for name in folder.models() if name != folder.transformer]


def sizes(folder: PipelineFolder, dtype: torch.dtype) -> dict[str, int]:
    return {name: component_bytes(folder.path / name, dtype) for name in other_components(folder)}


def load_components(folder: PipelineFolder, devices: dict[str, str], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Each component in `devices` (name -> "cpu" / "cuda:1" ...) loaded by its class from its sub-folder
    directly onto that device, in `dtype`, in eval mode."""
    out = {}
    for name, device in devices.items():
        library, cls_name = folder.components[name]
        cls = component_class(library, cls_name)
        out[name] = cls.from_pretrained(folder.path / name, dtype=dtype, device_map={"": device}).eval()
    return out


def assemble(folder: PipelineFolder, transformer: torch.nn.Module, components: dict[str, torch.nn.Module], dtype: torch.dtype):
    """The diffusers pipeline of `folder` made of these modules; diffusers loads the rest (tokenizers, scheduler)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder.path, **{folder.transformer: transformer}, **components, dtype=dtype)


def io_on_caller(module: torch.nn.Module, device) -> torch.nn.Module:
    """A module whose tensors sit on `device` (nothing is moved), callable from any device: its tensor inputs go
    to `device` and its outputs come back to the caller's (the device of its first tensor input), as
    accelerate's io_same_device does. Whatever device the pipeline computes on, every model hands its outputs
    back there. Torch hooks, first in line (`prepend`): the caller's device is read before any other pre-hook
    (a dispatched transformer's own) moves the inputs."""
    from accelerate.utils import send_to_device

    device = torch.device(device)
    caller = []

    def before(_, args, kwargs):
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        caller[:] = [first.device if first is not None else device]
        return send_to_device(args, device), send_to_device(kwargs, device)

    def after(_, args, kwargs, out):
        return send_to_device(out, caller[0])

    module.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    module.register_forward_hook(after, with_kwargs=True)
    return module
