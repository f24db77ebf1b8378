"""Tiny offline configs (transformers `from_config`) for every registered architecture.

Text models get 2-4 small layers; vision-language models a tiny text model and a tiny vision tower, so
the whole model builds in well under a second and every path of the spec can be resolved.
"""

from __future__ import annotations

from transformers import AutoConfig

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16)
GEMMA4_TEXT = dict(
    TEXT, num_hidden_layers=4, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    hidden_size_per_layer_input=32, vocab_size_per_layer_input=128, num_kv_shared_layers=2, global_head_dim=16,
)
# Mixture-of-experts: 8 experts, top 2; small expert widths (a multiple of 32, the export formats' packing).
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
GEMMA4_MOE = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _text(model_type: str, arch: str, **extra):
    return lambda: AutoConfig.for_model(model_type, architectures=[arch], **{**TEXT, **extra})


def _vlm(model_type: str, arch: str, text: dict, vision: dict, **top):
    def build():
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **top)
        config.architectures = [arch]
        return config

    return build


TINY = {
    "Qwen3MoeForCausalLM": _text("qwen3_moe", "Qwen3MoeForCausalLM", num_experts=8, **MOE),
    "Qwen2MoeForCausalLM": _text("qwen2_moe", "Qwen2MoeForCausalLM", num_experts=8, shared_expert_intermediate_size=64, **MOE),
    "MixtralForCausalLM": _text("mixtral", "MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "GptOssForCausalLM": _text("gpt_oss", "GptOssForCausalLM", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                               layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    # dense first layer, then MoE with one shared expert; multi-head latent attention (low-rank q / kv)
    "DeepseekV3ForCausalLM": _text("deepseek_v3", "DeepseekV3ForCausalLM", n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                   kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, **MOE),
    # Gemma 4 26B-A4B's layout: a mixture-of-experts branch beside the dense MLP, inside the VLM
    "Gemma4ForConditionalGeneration/moe": _vlm("gemma4", "Gemma4ForConditionalGeneration", {**GEMMA4_TEXT, **GEMMA4_MOE, "model_type": "gemma4_text"},
                                               dict(VISION, model_type="gemma4_vision", head_dim=16, num_key_value_heads=2)),
    "LlamaForCausalLM": _text("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": _text("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": _text("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": _text("qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": _text("gemma3_text", "Gemma3ForCausalLM", sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "Phi3ForCausalLM": _text("phi3", "Phi3ForCausalLM", pad_token_id=0),
    "Gemma4ForCausalLM": _text("gemma4_text", "Gemma4ForCausalLM", **{k: v for k, v in GEMMA4_TEXT.items() if k not in TEXT or k == "num_hidden_layers"}),
    "Gemma4ForConditionalGeneration": _vlm("gemma4", "Gemma4ForConditionalGeneration", {**GEMMA4_TEXT, "model_type": "gemma4_text"},
                                           dict(VISION, model_type="gemma4_vision", head_dim=16, num_key_value_heads=2)),
    "Gemma3ForConditionalGeneration": _vlm("gemma3", "Gemma3ForConditionalGeneration", dict(TEXT, model_type="gemma3_text", sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                                           dict(VISION, model_type="siglip_vision_model", image_size=32, patch_size=8), mm_tokens_per_image=4),
    "LlavaForConditionalGeneration": _vlm("llava", "LlavaForConditionalGeneration", dict(TEXT, model_type="llama"), dict(VISION, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32)),
    "LlavaNextForConditionalGeneration": _vlm("llava_next", "LlavaNextForConditionalGeneration", dict(TEXT, model_type="llama"), dict(VISION, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32)),
    "Mistral3ForConditionalGeneration": _vlm("mistral3", "Mistral3ForConditionalGeneration", dict(TEXT, model_type="mistral"), dict(VISION, model_type="pixtral", image_size=32, patch_size=8, head_dim=16)),
    "Qwen2_5_VLForConditionalGeneration": _vlm("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", dict(TEXT, model_type="qwen2_5_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}),
                                               dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0], window_size=16, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)),
    "Qwen2VLForConditionalGeneration": _vlm("qwen2_vl", "Qwen2VLForConditionalGeneration", dict(TEXT, model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}),
                                            dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)),
    "Qwen3VLForConditionalGeneration": _vlm("qwen3_vl", "Qwen3VLForConditionalGeneration", dict(TEXT, model_type="qwen3_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True, "rope_theta": 10000.0}),
                                            dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0], num_position_embeddings=16)),
}


# calibration text for tiny models (their tokenizers are trained on it)
TINY_TEXT = " ".join(["the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree"] * 200)


def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TINY_TEXT)
    return path


def logits(model, ids):
    """fp32 logits of one forward without cache."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def tiny_config(arch: str):
    return TINY[arch]()


def save_tiny_checkpoint(arch: str, path, text: str, seed: int = 0, **overrides):
    """A random tiny model of `arch` (norms perturbed, so no weight is a constant) plus a word-piece tokenizer
    of < 128 tokens trained on `text`, saved as a checkpoint folder; returns the fp model. overrides: config
    fields changed (e.g. num_experts)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.model.skeleton import model_class

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=100, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", pad_token="<pad>").save_pretrained(path)
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = model_class(config)._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.numel() > 0 and "inv_freq" not in name and ("norm" in name or "scalar" in name):
                t.copy_(t + 0.1 * torch.randn_like(t))
    model.save_pretrained(path)
    return model


LLAVA_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                  "{% endfor %}{% endfor %} ASSISTANT:")


def save_tiny_llava_with_processor(path, text: str):
    """A tiny LLaVA checkpoint (save_tiny_checkpoint) plus a real LlavaProcessor: a CLIP image processor at
    32 x 32 pixels (16 image tokens for 8-pixel patches) and the tokenizer with an <image> token."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    model = save_tiny_checkpoint("LlavaForConditionalGeneration", path, text)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.save_pretrained(path)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok,
                   patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
                   chat_template=LLAVA_TEMPLATE).save_pretrained(path)
    return model


def write_images(folder, n: int, seed: int = 0) -> list:
    """n random RGB PNGs of assorted sizes."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.random((24 + 8 * i, 40, 3)) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths
