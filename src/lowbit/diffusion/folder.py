"""A diffusers pipeline folder: model_index.json and one sub-folder per component, checked before any work.

Every component model_index.json names must be there (a model with its weights, a tokenizer or scheduler
with its files), and exactly one of them must be a transformer lowbit has a spec for; otherwise one line
says which and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from . import INDEX, is_pipeline  # noqa: F401  (is_pipeline: still importable from here)
from .spec import DiffusionSpec, diffusion_spec, registered_transformers


def component_class(library: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(library), name, None)
    except ImportError:
        return None


@dataclass
class PipelineFolder:
    path: Path
    pipeline_class: str
    components: dict[str, tuple[str, str]]  # name -> (library, class), the non-empty entries of model_index.json
    transformer: str  # the component lowbit quantizes
    spec: DiffusionSpec

    def models(self) -> list[str]:
        """The components that are torch modules (text encoders, VAE, transformer)."""
        out = []
        for name, (library, cls_name) in self.components.items():
            cls = component_class(library, cls_name)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                out.append(name)
        return out


def open_pipeline(path) -> PipelineFolder:
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LowbitError(f"cannot read {path / INDEX}: {err}", "point at a diffusers pipeline folder (save_pretrained of a pipeline)") from None
    components = {k: (v[0], v[1]) for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]}
    transformers = [k for k, (_, cls) in components.items() if diffusion_spec(cls) is not None]
    if not transformers:
        shown = ", ".join(f"{k} ({cls})" for k, (_, cls) in components.items()) or "none"
        raise LowbitError(f"the {index.get('_class_name', 'pipeline')} at {path} has no transformer lowbit can quantize (components: {shown})",
                          f"lowbit quantizes pipelines whose denoiser is one of {', '.join(registered_transformers())}")
    folder = PipelineFolder(path, index.get("_class_name", "DiffusionPipeline"), components, transformers[0], diffusion_spec(components[transformers[0]][1]))
    models = set(folder.models())
    for name, (_, cls) in components.items():
        sub = path / name
        files = [f for f in sub.iterdir() if f.is_file()] if sub.is_dir() else []
        weights = [f for f in files if f.suffix in (".safetensors", ".bin")]
        if not files or (name in models and not weights):
            what = "its weights are missing" if files else "the folder is missing or empty"
            raise LowbitError(f"pipeline folder {path} lacks its {name} component ({cls}): {what}",
                              f"copy the whole pipeline folder, with every component model_index.json lists (here: {', '.join(components)})")
    if not any(f.suffix == ".safetensors" for f in (path / folder.transformer).iterdir()):
        raise LowbitError(f"{path / folder.transformer} holds no *.safetensors weights", "re-save the pipeline with safe_serialization=True")
    return folder
