"""What the pipeline needs to know about a model family, and the registry that holds it.

Paths are dotted module names. `blocks` is relative to the model root; everything inside a block
(`linears`, `fp_linears`, scale groups) is relative to the block, so one spec serves every depth and size
of a family. Linear names are glob patterns (fnmatch: `*` matches across dots), so a block whose layers
differ (Gemma 4's KV-reuse layers have no k/v projections) is described once: each block's own Linear
modules are matched against the patterns, and a Linear that matches none is an error, never silently
left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of `prev` (AWQ folds a per-channel scale into `prev`)."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of one architecture family.

    Args:
        blocks: the ModuleList of repeated blocks, e.g. "model.layers" or, in a VLM, "model.language_model.layers".
        linears: patterns of the block's linears to quantize, relative to the block.
        fp_linears: patterns of block linears never quantized (MoE routers and gates: tiny, and their
            errors re-route tokens).
        embed: the input embedding (the tied lm_head source).
        post_block: modules after the last block (final norm).
        lm_head: the output projection; kept in full precision unless asked otherwise.
        keep_fp: patterns of sub-models outside the blocks kept in full precision and listed as such in
            every export's config (vision towers, projectors, audio towers, Gemma 4's per-layer tables).
        media: the keep_fp sub-models that text input never reaches (vision / audio towers, projectors):
            not loaded for text-only calibration.
        scale_groups: AWQ scale groups inside a block (a group whose modules a layer lacks is skipped there).
        norm_weight_offset: the block's norms compute x_hat * (offset + weight): 0 for Llama-style
            norms, 1 for Gemma 3's; AWQ folds a scale s into a norm as (offset + weight) / s - offset.
        state_kwargs: block arguments through which blocks share state (Gemma 4's `shared_kv_states`: a
            KV-storing layer writes it, later KV-reuse layers read it). The block engine gives each sample
            its own, carried from block to block like the hidden states.
        text_only: calibration with images cannot be replayed exactly block by block (Qwen3-VL adds
            deepstack visual features between blocks, outside any block's forward): a reason, or "".
        block_outputs: the block arguments a block's return values feed into the next block, in return
            order; () = the first return value is the next block's hidden states (decoder layers). A
            diffusion transformer's joint blocks take and return two streams: ("encoder_hidden_states",
            "hidden_states"); the block engine carries both per sample.
    """

    blocks: str
    linears: tuple[str, ...]
    fp_linears: tuple[str, ...] = ()
    embed: str = "model.embed_tokens"
    post_block: tuple[str, ...] = ("model.norm",)
    lm_head: str = "lm_head"
    keep_fp: tuple[str, ...] = ()
    media: tuple[str, ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = field(default=())
    norm_weight_offset: float = 0.0
    state_kwargs: tuple[str, ...] = ()
    text_only: str = ""
    block_outputs: tuple[str, ...] = ()

    def in_blocks(self, name: str) -> bool:
        return name.startswith(self.blocks + ".")

    def is_kept_fp(self, name: str) -> bool:
        """True for a module or tensor name under one of the keep_fp sub-models."""
        return _under(name, self.keep_fp)

    def is_media(self, name: str) -> bool:
        return _under(name, self.media)

    def block_linears(self, block: torch.nn.Module, prefix: str) -> tuple[list[str], list[str]]:
        """(names to quantize, names kept in fp) of one block's Linear modules, block-relative.

        A Linear matching neither `linears` nor `fp_linears` means the spec is out of date for this
        model: a one-line error naming it (quantizing or skipping it silently would both be wrong)."""
        quantize, fp = [], []
        for name, module in block.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if any(fnmatchcase(name, p) for p in self.fp_linears):
                fp.append(name)
            elif any(fnmatchcase(name, p) for p in self.linears):
                quantize.append(name)
            else:
                raise LowbitError(
                    f"linear {prefix}.{name} matches no pattern of the architecture spec",
                    "add it to the spec's linears (to quantize) or fp_linears (to keep) in src/lowbit/arch/families.py",
                )
        return quantize, fp


def _under(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec, *architectures: str) -> ArchSpec:
    for name in architectures:
        _REGISTRY[name] = spec
    return spec


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(config) -> ArchSpec:
    """The spec for a transformers config (by `config.architectures[0]`), or a one-line error."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    shown = names[0] if names else f"model_type {getattr(config, 'model_type', '?')!r}"
    raise LowbitError(
        f"unknown architecture {shown}: lowbit has no spec for it",
        "add an ArchSpec for it in src/lowbit/arch/families.py (blocks path, block linears) and register it "
        f"under that name; known: {', '.join(registered_architectures())}",
    )
