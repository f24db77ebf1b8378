"""Built-in architecture specs. Adding a family is adding an entry here (and a tiny config in tests/arch).

Each entry says where the blocks are and which linears a block holds; the AWQ scale groups say which
linears read the same input (the output of a norm or of another linear). v -> o is folded only where the
shapes allow (AWQ checks o_proj's inputs match v_proj's outputs on each layer).

Vision-language models keep their language model's decoder blocks under `model.language_model.layers`
(transformers 5 layout); the vision tower, the projector and anything else outside the blocks stays in
full precision (`keep_fp`) and is listed in every export's config.
"""

from __future__ import annotations

from dataclasses import replace

from .spec import ArchSpec, ScaleGroup, register

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKV = ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_VO = ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",))
_UD = ScaleGroup("mlp.up_proj", ("mlp.down_proj",))

_LLAMA_GROUPS = (_QKV, _VO, ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UD)
# Gemma 3 / 4: norms sit before *and* after attention / MLP; the MLP reads pre_feedforward_layernorm.
_GEMMA_GROUPS = (_QKV, _VO, ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UD)

# Llama and its close relatives: identical module names, different attention details.
DECODER = register(
    ArchSpec(blocks="model.layers", linears=_ATTN + _MLP, scale_groups=_LLAMA_GROUPS),
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

GEMMA3 = register(
    ArchSpec(
        blocks="model.layers",
        linears=_ATTN + _MLP,
        scale_groups=_GEMMA_GROUPS,
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

# Gemma 4 (text): sliding / full attention layers with their own masks and rotary tables; per-layer
# inputs (a [T, 256] embedding slice per block, gated into the residual by per_layer_input_gate /
# per_layer_projection); KV sharing: the last `num_kv_shared_layers` layers have no k/v projections and
# read the keys / values the last storing layer of their attention type wrote into `shared_kv_states`.
# Gemma4RMSNorm computes x_hat * weight (no +1, unlike Gemma 3). The per-layer embedding table and its
# model-level projection run before block 0 and stay in full precision.
# Gemma 4 26B-A4B adds a mixture-of-experts branch beside the dense MLP of every block: `router.proj`
# (kept in fp) and `experts` (unfused per expert, arch/experts.py).
GEMMA4_TEXT = register(
    ArchSpec(
        blocks="model.layers",
        linears=_ATTN + _MLP + ("per_layer_input_gate", "per_layer_projection", "experts.*"),
        fp_linears=("router.proj",),
        scale_groups=_GEMMA_GROUPS,
        keep_fp=("model.embed_tokens_per_layer", "model.per_layer_model_projection"),
        state_kwargs=("shared_kv_states",),
    ),
    "Gemma4ForCausalLM",
)


def multimodal(text: ArchSpec, media: tuple[str, ...], text_only: str = "") -> ArchSpec:
    """A text spec re-rooted under model.language_model; the media sub-models (towers, projectors) kept in fp."""
    inner = tuple(p.replace("model.", "model.language_model.", 1) for p in text.keep_fp)
    return replace(
        text,
        blocks="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        post_block=("model.language_model.norm",),
        keep_fp=inner + media,
        media=media,
        text_only=text_only,
    )


_LLAVA_FP = ("model.vision_tower", "model.multi_modal_projector")
GEMMA4 = register(multimodal(GEMMA4_TEXT, ("model.vision_tower", "model.embed_vision", "model.audio_tower", "model.embed_audio")), "Gemma4ForConditionalGeneration")
GEMMA3_VLM = register(multimodal(GEMMA3, _LLAVA_FP), "Gemma3ForConditionalGeneration")
LLAVA = register(multimodal(DECODER, _LLAVA_FP), "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Mistral3ForConditionalGeneration")
QWEN2_5_VL = register(multimodal(DECODER, ("model.visual",)), "Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
QWEN3_VL = register(
    multimodal(
        replace(DECODER, linears=_ATTN + _MLP),
        ("model.visual",),
        text_only="Qwen3-VL adds deepstack visual features to the hidden states between its first blocks, outside any "
        "block; calibrate on text (the default)",
    ),
    "Qwen3VLForConditionalGeneration",
)


# Mixture-of-experts decoders. transformers fuses each block's experts into 3-D parameters; lowbit unfuses
# them into one linear per expert projection (arch/experts.py), named as the checkpoint names them
# (`mlp.experts.{i}.gate_proj`, Mixtral's `mlp.experts.{i}.w1`), so `mlp.experts.*` covers them all. Routers
# are not nn.Linear modules in transformers 5 (they stay in fp untouched); the shared-expert gate is, and is
# kept. Dense MLPs (Qwen3-MoE's mlp_only_layers, DeepSeek's first_k_dense_replace layers) use _MLP.
_EXPERTS = ("mlp.experts.*",)
MOE = register(
    ArchSpec(blocks="model.layers", linears=_ATTN + _MLP + _EXPERTS, scale_groups=_LLAMA_GROUPS),
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)
QWEN2_MOE = register(
    replace(MOE, linears=MOE.linears + ("mlp.shared_expert.*",), fp_linears=("mlp.shared_expert_gate",)),
    "Qwen2MoeForCausalLM",
)
# gpt-oss: biased attention and experts (fused [E, H, 2I], gate / up interleaved), attention sinks.
GPT_OSS = register(ArchSpec(blocks="model.layers", linears=_ATTN + _EXPERTS, scale_groups=(_QKV, _VO)), "GptOssForCausalLM")
# DeepSeek-V3: multi-head latent attention (low-rank q and kv projections), dense first layers, shared experts.
_MLA = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj")
DEEPSEEK_V3 = register(
    ArchSpec(
        blocks="model.layers",
        linears=_MLA + _MLP + _EXPERTS + ("mlp.shared_experts.*",),
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            _UD,
        ),
    ),
    "DeepseekV3ForCausalLM",
)
