"""Append tensors to numbered safetensors shards as they are produced, then write the index.

Tensors are buffered until the caller flushes (at a block boundary, once `full`), each flush writing
`model-NNNNN.safetensors`, so RAM holds about one shard's worth of output. `model.safetensors.index.json` (the transformers sharded layout)
maps every tensor to its file; a single shard is renamed to plain `model.safetensors`. `stem` names them otherwise
(diffusers models: `diffusion_pytorch_model`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int, stem: str = "model"):
        self.folder, self.stem = Path(folder), stem
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.shards: list[str] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            if name in self.weight_map or name in self.buffer:
                raise ValueError(f"tensor {name} written twice")
        for name, t in host_copies(tensors).items():
            self.buffer[name] = t
            self.buffered += t.numel() * t.element_size()

    @property
    def full(self) -> bool:
        """The buffer reached the shard size: the caller should flush (at a block boundary)."""
        return self.buffered >= self.max_shard_bytes

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.stem}-{len(self.shards) + 1:05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.folder / name)  # a shard file is either complete or absent
        self.shards.append(name)
        for key in self.buffer:
            self.weight_map[key] = name
        self.total_bytes += self.buffered
        self.buffer, self.buffered = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / self.shards[0], self.folder / f"{self.stem}.safetensors")
            return
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX.replace("model", self.stem, 1)).write_text(json.dumps(index, indent=2))


def host_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors` (never views: a tensor read from a checkpoint shard is a view of that shard's
    memory map, and holding it would keep the whole map, every page the block touched, resident). The tensors
    of one accelerator come back in one transfer: their bytes joined into one buffer on the device, copied,
    then cut into CPU tensors of their own (a MoE block's ~1,200 packed tensors: one wait, not one each)."""
    out: dict[str, torch.Tensor] = {}
    by_device: dict[torch.device, list[str]] = {}
    for name, t in tensors.items():
        if t.device.type == "cpu":
            out[name] = t.detach().to("cpu", copy=True).contiguous()
        else:
            by_device.setdefault(t.device, []).append(name)
    for names in by_device.values():
        parts = [tensors[n].detach().contiguous() for n in names]
        joined = torch.cat([t.reshape(-1).view(torch.uint8) for t in parts]).cpu()  # [total bytes]
        start = 0
        for name, t in zip(names, parts):
            size = t.numel() * t.element_size()
            out[name] = joined[start : start + size].clone().view(t.dtype).view(t.shape)  # its own storage
            start += size
    return {name: out[name] for name in tensors}
