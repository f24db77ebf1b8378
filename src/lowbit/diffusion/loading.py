"""lowbit.load_pipeline: a quantized pipeline folder as a diffusers pipeline whose transformer computes with
lowbit's QuantLinear (Triton kernels on CUDA, torch dequantization on the CPU).

The transformer is built on `meta` from its diffusers config, its quantized linears swapped for QuantLinear
and every tensor streamed from the shards to its device (loading.fill_quantized, shared with lowbit.load);
the other components are loaded straight onto their devices (components.py). With several devices the
components and the transformer's blocks are placed by placement.plan_placement, every component's memory counted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading import fill_quantized, read_quantization_config
from .folder import open_pipeline
from .model import build_transformer, open_transformer, stored_bytes
from .components import assemble, io_on_caller, load_components, other_components
from .components import sizes as component_sizes
from .placement import plan_placement


def load_pipeline(path, device_map=None, dtype: torch.dtype | None = None, max_memory: dict | None = None):
    """Load `lowbit quantize PIPELINE_DIR`'s output (or any pipeline whose transformer config holds an
    auto_round / gptq / awq / compressed-tensors quantization_config lowbit reads).

    Args:
        device_map: None or "cpu" (the CPU), a device ("cuda:0": everything there), or "auto": every GPU,
            each component placed whole and the transformer's blocks spread over what remains (max_memory
            caps each device, accelerate's form: {0: "20GiB", 1: "20GiB"}).
        dtype: of the full-precision tensors and activations; default float32 on the CPU, bfloat16 on GPUs.
    """
    folder = open_pipeline(path)
    on_gpu = device_map not in (None, "cpu") and torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    sub = Path(path) / folder.transformer
    ckpt = open_transformer(sub)
    qc = read_quantization_config(sub)
    transformer = build_transformer(ckpt.config, dtype)
    home = "cpu" if not on_gpu else ("cuda:0" if device_map == "auto" else str(torch.device(device_map)))
    placement = None
    if device_map == "auto" and on_gpu:
        # sizes: the components' tensors at `dtype`, the transformer's as stored by block (packed where quantized)
        stored = stored_bytes(ckpt)
        blocks = [(f"{lst}.{i}", sum(b for n, b in stored.items() if n.startswith(f"{lst}.{i}."))) for lst in folder.spec.block_lists
                  for i in range(len(transformer.get_submodule(lst)))]
        rest = sum(b for n, b in stored.items() if not folder.spec.in_blocks(n))
        memory = max_memory or {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        placement = plan_placement(component_sizes(folder, dtype), rest, blocks, memory, home)
        transformer_map = placement.block_map(home)
    else:
        transformer_map = {"": home}
    transformer = fill_quantized(transformer, ckpt, qc, transformer_map, dtype)
    devices = {name: placement.components[name] if placement else home for name in other_components(folder)}
    components = load_components(folder, devices, dtype)  # each straight onto its device
    if placement:  # several devices: every model takes its inputs on its device and returns to the caller's
        for name, module in [*components.items(), (folder.transformer, transformer)]:
            io_on_caller(module, devices.get(name, home))
    pipe = assemble(folder, transformer, components, dtype)
    pipe.lowbit_placement = placement
    return pipe
