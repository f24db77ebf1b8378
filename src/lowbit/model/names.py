"""Checkpoint tensor names -> the model's parameter names, through transformers' own renaming rules.

Checkpoints on the hub predate the layouts transformers builds now (LLaVA-style VLMs saved as
`language_model.model.layers.*`, loaded as `model.language_model.layers.*`). transformers renames keys
when it loads a checkpoint (`conversion_mapping`: WeightRenaming rules per model class, plus the
base-model prefix added or stripped); lowbit applies the very same rules, once, before any work, so every
tensor of the model is found (or the missing ones are listed) before block 0 and the export is written
under the names transformers builds.

Mixture-of-experts skeletons are unfused (arch/experts.py): one linear per expert projection. Per-expert
checkpoint tensors (`mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`),
which transformers would fuse with a WeightConverter, map by their renamed name; checkpoints that store the
experts fused (gpt-oss: `mlp.experts.gate_up_proj` [E, H, 2I]) map each per-expert tensor to a slice of the
fused one (`NameMap.parts`). A fused tensor that transformers itself converts on load (a transpose, say) is
in a layout lowbit does not read yet: refused by name. Other converted keys are reported as unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..arch.experts import FusedPart, experts_modules, fused_sources
from ..errors import LowbitError


@dataclass
class NameMap:
    """model name -> checkpoint key; `parts`: model name -> slice of a fused checkpoint tensor (experts);
    `unmapped`: checkpoint keys that match no tensor of the model."""

    to_checkpoint: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    parts: dict[str, FusedPart] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return self.to_checkpoint[name]

    def get(self, name: str) -> str | None:
        return self.to_checkpoint.get(name)

    def has(self, name: str) -> bool:
        return name in self.to_checkpoint or name in self.parts

    def read(self, ckpt, name: str) -> torch.Tensor:
        """The model tensor `name` from the checkpoint (a slice of a fused tensor for fused experts)."""
        part = self.parts.get(name)
        if part is not None:
            return part.read(ckpt.tensor(part.key))
        return ckpt.tensor(self.to_checkpoint[name])


def _renamer(model):
    """key -> (renamed key, converted?, the key renamed without converters) with transformers' rules for this
    model; identity if unavailable."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are used as they are
        return lambda key, meta: (key, False, key)
    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str, meta: dict):
        new, converter = rename_source_key(key, renamings, converters, prefix, meta)
        if converter is None:
            return new, False, new
        return new, True, rename_source_key(key, renamings, [], prefix, meta)[0]

    try:  # the API is young: a transformers whose signature differs is used without renaming
        rename("lowbit.probe", {})
    except Exception:  # noqa: BLE001
        return lambda key, meta: (key, False, key)
    return rename


def map_names(model: torch.nn.Module, checkpoint_keys) -> NameMap:
    """Map every checkpoint key onto the model's state dict (tied parameters read their source)."""
    state = model.state_dict(keep_vars=True)
    rename = _renamer(model)
    names = NameMap()
    fused: dict[str, list[tuple[str, FusedPart]]] = {}  # fused tensor's model name -> the per-expert tensors in it
    for prefix, module in experts_modules(model).items():
        for name, (fused_name, part) in fused_sources(module.lowbit_layout, prefix).items():
            fused.setdefault(fused_name, []).append((name, part))
    for key in checkpoint_keys:
        new, converted, plain = rename(key, state)
        if new in state and not converted:
            names.to_checkpoint[new] = key
        elif converted and plain in state:  # a per-expert tensor that transformers would fuse: ours is unfused
            names.to_checkpoint[plain] = key
        elif plain in fused:
            if converted:
                raise LowbitError(f"checkpoint tensor {key} holds fused experts in a layout transformers converts when it loads",
                                  "lowbit reads per-expert tensors or fused ones in the model's own layout; re-save the checkpoint with transformers' save_pretrained")
            for name, part in fused[plain]:
                names.parts[name] = replace(part, key=key)
        else:
            names.unmapped.append(key)
    # tied parameters (lm_head reading the embedding): the same Parameter object under several names
    by_object: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_object.setdefault(id(p), []).append(name)
    for aliases in by_object.values():
        source = next((a for a in aliases if a in names.to_checkpoint), None)
        for alias in aliases:
            if source and alias not in names.to_checkpoint:
                names.to_checkpoint[alias] = names.to_checkpoint[source]
    return names


def check_complete(model: torch.nn.Module, names: NameMap, path) -> None:
    """Every parameter (and every persistent buffer still on meta) must come from the checkpoint."""
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if not names.has(n) and t.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:3])
        raise LowbitError(
            f"the checkpoint at {path} lacks {len(missing)} tensors the model needs, e.g. {shown}"
            + (f" (and has {len(names.unmapped)} that match nothing, e.g. {names.unmapped[0]})" if names.unmapped else ""),
            "the checkpoint is incomplete, for another architecture, or in a layout lowbit cannot map yet",
        )
