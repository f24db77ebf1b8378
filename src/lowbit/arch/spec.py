"""What the pipeline needs to know about a model family, and the registry that holds it.

Paths are dotted module names. `blocks` is relative to the model root; everything inside a block
(`linears`, scale groups) is relative to the block, so one spec serves every depth and size of a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        blocks: the ModuleList of repeated blocks, e.g. "model.layers".
        linears: every nn.Linear inside one block, relative to the block (tests check full coverage).
        embed: the input embedding (loaded before block 0; also the tied lm_head source).
        pre_block: other modules with weights that run before block 0 (rotary tables are buffers and
            need no loading).
        post_block: modules after the last block (final norm), loaded only for evaluation.
        lm_head: the output projection; kept in full precision unless asked otherwise.
        keep_fp: sub-models never quantized (vision towers, projectors).
        scale_groups: AWQ scale groups inside a block.
        norm_weight_offset: the block's norms compute x_hat * (offset + weight): 0 for Llama-style
            norms, 1 for Gemma's; AWQ folds a scale s into a norm as (offset + weight) / s - offset.
    """

    blocks: str
    linears: tuple[str, ...]
    embed: str = "model.embed_tokens"
    pre_block: tuple[str, ...] = ()
    post_block: tuple[str, ...] = ("model.norm",)
    lm_head: str = "lm_head"
    keep_fp: tuple[str, ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = field(default=())
    norm_weight_offset: float = 0.0


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
