"""A Hugging Face checkpoint folder opened lazily: config plus a tensor-name -> shard-file index.

Only safetensors headers are read when the checkpoint opens; a tensor's bytes are read when asked for,
so a block can be loaded without touching the rest of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from ..errors import LowbitError


def read_weight_maps(folder: Path) -> dict[str, Path] | None:
    """name -> shard file from the folder's `*.safetensors.index.json` files (transformers' sharded layout), or
    None without one. Tensors in no index are not part of the checkpoint, as for transformers' loaders: a shard
    may hold more than its index lists, and a folder may hold other safetensors files beside the shards
    (Mistral's repositories ship consolidated.safetensors, the same weights under other names)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    out: dict[str, Path] = {}
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise LowbitError(f"cannot read {index.name}: {type(err).__name__}: {err}", "re-download the checkpoint, or delete the index if the folder holds one safetensors file") from None
        present: dict[str, bool] = {}
        for name, file in weight_map.items():
            if not present.setdefault(file, (folder / file).is_file()):
                raise LowbitError(f"{index.name} lists {file} for {name}, which is not in {folder}", "download every shard the index lists")
            out[name] = folder / file
    return out


class Checkpoint:
    """config.json + *.safetensors in one folder. `read_config(path)` reads the config (default transformers'
    AutoConfig; a diffusers model's config is its JSON dict, diffusion/model.py)."""

    def __init__(self, path: str | Path, read_config=None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise LowbitError(f"model path {str(path)!r} is not a folder", "pass a Hugging Face checkpoint folder, a .gguf file or 'default'")
        if not (self.path / "config.json").is_file():
            raise LowbitError(f"{self.path} has no config.json", "point at the folder that holds config.json and the *.safetensors weights")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = list(self.path.glob("*.bin"))
            hint = "convert the *.bin weights with save_pretrained(safe_serialization=True)" if bins else "the folder must hold *.safetensors weights"
            raise LowbitError(f"{self.path} has no *.safetensors weights", hint)
        try:
            self.config = (read_config or AutoConfig.from_pretrained)(self.path)
        except Exception as err:  # transformers raises many types here; the message is what matters
            raise LowbitError(f"cannot read {self.path / 'config.json'}: {err}", "check the file is a valid transformers config") from None
        listed = read_weight_maps(self.path)  # name -> file, when the folder has a *.safetensors.index.json
        if listed is not None:  # the files it names, as transformers loads them (not e.g. a stray consolidated.safetensors)
            files = sorted(set(listed.values()))
        self.index: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        if listed is None or listed.get(name) == file:
                            self.index[name] = file
            except (SafetensorError, OSError, ValueError) as err:
                raise LowbitError(f"corrupt safetensors file {file.name}: {err}", "re-download or re-save the checkpoint") from None
        if listed is not None and len(self.index) < len(listed):
            name = next(n for n in listed if n not in self.index)
            raise LowbitError(f"tensor {name!r} is listed in the index for {listed[name].name} but that file does not hold it",
                              "the index and the shards disagree; re-download or re-save the checkpoint")
        self._handles: dict[Path, object] = {}

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.index.values()))

    def has(self, name: str) -> bool:
        return name in self.index

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (memory-mapped: only its bytes are touched)."""
        file = self.index.get(name)
        if file is None:
            raise LowbitError(f"tensor {name!r} is missing from the checkpoint at {self.path}", "the checkpoint is incomplete or for another architecture")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt")
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise LowbitError(f"cannot read tensor {name!r} from {file.name}: {err}", "the file is corrupt; re-download or re-save the checkpoint") from None

    def names_under(self, prefix: str) -> list[str]:
        dotted = prefix + "."
        return [n for n in self.index if n.startswith(dotted)]

    def close(self) -> None:
        """Drop the open shard handles. Tensors read from a shard are views of its memory map; the map
        lives on while they do, and is unmapped (its pages leave RSS) once they and the handle are gone."""
        self._handles.clear()


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
