"""Built-in architecture specs. Adding a family is adding an entry here (and a tiny config in the tests).

Each entry says where the blocks are and which linears a block holds; the AWQ scale groups say which
linears read the same input (the output of a norm or of another linear). v -> o is declared only where
the shapes allow folding (no grouped-query attention: o_proj's inputs must match v_proj's outputs).
"""

from .spec import ArchSpec, ScaleGroup, register

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)

# Llama and its close relatives: identical module names, different attention details.
DECODER = register(
    ArchSpec(blocks="model.layers", linears=_ATTN + _MLP, scale_groups=_LLAMA_GROUPS),
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# Gemma 3: norms sit before *and* after attention / MLP; the MLP reads pre_feedforward_layernorm.
GEMMA3 = register(
    ArchSpec(
        blocks="model.layers",
        linears=_ATTN + _MLP,
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        norm_weight_offset=1.0,  # Gemma3RMSNorm computes x_hat * (1 + weight)
    ),
    "Gemma3ForCausalLM",
)

# Phi-3: fused qkv and gate_up projections (down_proj reads act(gate) * up, so no group folds into it).
PHI3 = register(
    ArchSpec(
        blocks="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
    ),
    "Phi3ForCausalLM",
)
