"""Tiny diffusion transformers and a tiny FLUX pipeline, built offline from configs.

The tokenizers are trained here on a few sentences (tokenizers' WordLevel model, saved as fast tokenizers):
no hub. Widths are multiples of 32 so every block linear packs at 2/4/8 bits with group size 32.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a photo of red cat dog on the grass under blue sky painting oil old house river bridge at night city lights "
         "portrait woman man hat mountain snow forest lake boat sunset beach sand castle tree flower garden car street rain").split()

FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=32, num_attention_heads=2,
                       joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                       dual_attention_layers=(0,), qk_norm="rms_norm")


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random non-trivial values for parameters initialised to constants (norm weights and biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name and t.dim() == 1:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))


def tiny_transformer(kind: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_TRANSFORMER) if kind == "flux" else SD3Transformer2DModel(**SD3_TRANSFORMER)
    perturb_norms(model, seed)
    return model.eval()


def word_tokenizer(max_length: int):
    """A fast tokenizer over WORDS (unknown words -> <unk>), padded to max_length by the pipelines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer_config: dict | None = None, clip: dict | None = None, t5: dict | None = None,
                       vae: dict | None = None):
    """A FluxPipeline of random tiny components: CLIP and T5 text encoders, a 2-level AutoencoderKL
    (latents of 4 channels at 1/2 the image size, packed 2x2 into 16 channels per token)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = {**FLUX_TRANSFORMER, **(transformer_config or {})}
    torch.manual_seed(seed)
    vocab = len(WORDS) + 3
    clip_config = CLIPTextConfig(**{**dict(vocab_size=vocab, hidden_size=config["pooled_projection_dim"], intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=1, pad_token_id=0), **(clip or {})})
    t5_config = T5Config(**{**dict(vocab_size=vocab, d_model=config["joint_attention_dim"], d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), **(t5 or {})})
    transformer = FluxTransformer2DModel(**config)
    perturb_norms(transformer, seed)
    levels = (vae or {}).get("levels", 2)  # the VAE halves the size per level after the first
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=(8, 16, 16, 16)[:levels], layers_per_block=1, latent_channels=config["in_channels"] // 4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5, shift_factor=0.1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=CLIPTextModel(clip_config), tokenizer=word_tokenizer(16),
                        text_encoder_2=T5EncoderModel(t5_config), tokenizer_2=word_tokenizer(16), transformer=transformer)
    for component in (vae, pipe.text_encoder, pipe.text_encoder_2, transformer):
        component.eval()  # built in train mode: T5's dropout would make every run differ
    return pipe.to(dtype)


def save_tiny_flux_pipeline(path: Path, seed: int = 0, **kwargs) -> Path:
    tiny_flux_pipeline(seed, **kwargs).save_pretrained(path)
    return Path(path)


# what the tests generate with (and calibrate on): 16x16 images, 16 text tokens, 2 steps
GENERATE = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, guidance_scale=3.5)


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusion3Pipeline of random tiny components: two CLIP encoders with projections (pooled 16 + 16
    = the transformer's 32), a T5 encoder (32 wide, the CLIP states are zero-padded to it), a 2-level VAE with 4
    latent channels; classifier-free guidance batches the unconditional and conditional inputs per call."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(WORDS) + 3
    clip = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                projection_dim=16, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    t5 = T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    perturb_norms(transformer, seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=word_tokenizer(16),
                                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=word_tokenizer(16),
                                    text_encoder_3=T5EncoderModel(t5), tokenizer_3=word_tokenizer(16))
    for component in (vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, transformer):
        component.eval()
    return pipe.to(dtype)


SD3_GENERATE = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, guidance_scale=5.0)
