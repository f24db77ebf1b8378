"""What lowbit knows about a diffusers denoising transformer, as data, registered by its diffusers class name.

A FLUX transformer runs its double-stream blocks (`transformer_blocks`: image and text tokens with their own
weights, joint attention) and then its single-stream blocks (`single_transformer_blocks`); SD3's joint blocks
are one list. Every block takes `(hidden_states, encoder_hidden_states, temb, ...)` and returns
`(encoder_hidden_states, hidden_states)` (SD3's last block returns None for the text tokens): both streams are
carried from block to block (`ArchSpec.block_outputs`), so the block engine replays them like an LLM's hidden
states. Everything outside the blocks (patch / text / timestep embedders, final norm and projection) stays in
full precision, as do the pipeline's other components (text encoders, VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.spec import ArchSpec
from ..errors import LowbitError

JOINT_OUTPUTS = ("encoder_hidden_states", "hidden_states")  # what a joint block returns, in order


@dataclass(frozen=True)
class DiffusionSpec:
    """One diffusers transformer class.

    Args:
        block_lists: the ModuleLists of blocks, in the order the forward runs them; a block's global index
            is its position in their concatenation.
        blocks: linear patterns of every kind of block (block-relative, fnmatch), AWQ scale groups and the
            carried outputs, as an ArchSpec (its `blocks` is the first list; exporters list all of them).
        batch_inputs: the transformer forward's arguments that carry the batch on dim 0; the others (FLUX's
            img_ids / txt_ids) are shared by the batch. Calibration splits each batched call per sample.
        none_if_empty: transformer arguments whose empty value means "none" (pipelines pass
            `joint_attention_kwargs={}`, which every block reads as `or {}`): given as None, so the blocks
            receive no container the capture would have to treat as shared state.
        unsupported: method name -> why it cannot work on these blocks (refused before any work).
    """

    block_lists: tuple[str, ...]
    blocks: ArchSpec
    batch_inputs: tuple[str, ...]
    none_if_empty: tuple[str, ...] = ("joint_attention_kwargs",)
    unsupported: tuple[tuple[str, str], ...] = ()

    @property
    def block_names(self) -> str:
        """The block lists as auto-round's `block_name_to_quantize` spells several: comma separated."""
        return ",".join(self.block_lists)

    def in_blocks(self, name: str) -> bool:
        return any(name.startswith(b + ".") for b in self.block_lists)


# AdaLN modulation linears (norm*.linear) read the timestep embedding, the others the tokens; no norm
# before a linear is foldable (its output is modulated per sample by shift / scale), and joint attention
# mixes the text and image values, so AWQ has no scale groups here.
_NO_AWQ = (("awq", "AWQ folds a per-channel scale into the layer before each linear, and these blocks have none it can "
                   "take: AdaLN modulates every norm's output per sample, and joint attention mixes the text and image values"),)
_FLUX_LINEARS = ("norm1.linear", "norm1_context.linear", "norm.linear", "attn.*", "ff.net.*", "ff_context.net.*", "proj_mlp", "proj_out")
_SD3_LINEARS = ("norm1.linear", "norm1_context.linear", "attn.*", "attn2.*", "ff.net.*", "ff_context.net.*")

FLUX = DiffusionSpec(
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    blocks=ArchSpec(blocks="transformer_blocks", linears=_FLUX_LINEARS, embed="x_embedder", post_block=("norm_out",), lm_head="proj_out",
                    block_outputs=JOINT_OUTPUTS),
    batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    unsupported=_NO_AWQ,
)
SD3 = DiffusionSpec(
    block_lists=("transformer_blocks",),
    blocks=ArchSpec(blocks="transformer_blocks", linears=_SD3_LINEARS, embed="pos_embed", post_block=("norm_out",), lm_head="proj_out",
                    block_outputs=JOINT_OUTPUTS),
    batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    unsupported=_NO_AWQ,
)

_REGISTRY = {"FluxTransformer2DModel": FLUX, "SD3Transformer2DModel": SD3}


def registered_transformers() -> list[str]:
    return sorted(_REGISTRY)


def diffusion_spec(class_name: str | None) -> DiffusionSpec | None:
    return _REGISTRY.get(class_name or "")


def require_spec(class_name: str | None, where: str) -> DiffusionSpec:
    spec = diffusion_spec(class_name)
    if spec is None:
        raise LowbitError(f"{where} holds a {class_name or 'model of unknown class'}, which lowbit cannot quantize",
                          f"lowbit quantizes pipelines whose transformer is one of {', '.join(registered_transformers())}")
    return spec
