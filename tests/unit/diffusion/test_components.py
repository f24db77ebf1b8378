"""The pipeline's other components loaded by their own classes straight onto their devices (components.py),
against diffusers' own `DiffusionPipeline.from_pretrained` (everything on the CPU, then cast): the same
modules, the same latents. On the CPU every device is "cpu"; what loading onto a GPU saves in RAM only a GPU
run shows (bench/diffusion_scale.py --device_map 0,1)."""

import pytest
import torch

from lowbit.diffusion.components import assemble, component_bytes, io_on_caller, load_components, other_components, sizes
from lowbit.diffusion.folder import open_pipeline
from tests.diffusion_tiny import GENERATE, save_tiny_flux_pipeline


@pytest.fixture(scope="module")
def bf16_pipeline(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("pipe") / "flux", dtype=torch.bfloat16)


def latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(["a red cat on the grass", "old house at night"], generator=torch.Generator().manual_seed(3), output_type="latent", **GENERATE).images


def test_sizes_are_the_components_tensors_at_the_load_dtype(bf16_pipeline):
    from transformers import T5EncoderModel

    folder = open_pipeline(bf16_pipeline)
    assert sorted(other_components(folder)) == ["text_encoder", "text_encoder_2", "vae"]
    t5 = T5EncoderModel.from_pretrained(bf16_pipeline / "text_encoder_2")
    unique = {t.data_ptr(): t.numel() for t in t5.state_dict().values()}  # the tied embedding once, as stored
    assert component_bytes(bf16_pipeline / "text_encoder_2", torch.float32) == 4 * sum(unique.values())
    assert component_bytes(bf16_pipeline / "text_encoder_2", torch.bfloat16) == 2 * sum(unique.values())
    assert set(sizes(folder, torch.float32)) == {"text_encoder", "text_encoder_2", "vae"}


def test_components_loaded_directly_give_diffusers_own_latents(bf16_pipeline):
    """Stored in bf16, loaded in fp32 by both paths: the same dtype, device, weights and latents (exactly)."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    reference = DiffusionPipeline.from_pretrained(bf16_pipeline, dtype=torch.float32)
    folder = open_pipeline(bf16_pipeline)
    components = load_components(folder, {name: "cpu" for name in other_components(folder)}, torch.float32)
    for name, module in components.items():
        io_on_caller(module, "cpu")
        assert {p.device.type for p in module.parameters()} == {"cpu"} and {p.dtype for p in module.parameters()} == {torch.float32}
        assert not module.training
        theirs = reference.components[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, theirs[key]), (name, key)
    transformer = FluxTransformer2DModel.from_pretrained(bf16_pipeline / "transformer", dtype=torch.float32)
    pipe = assemble(folder, transformer, components, torch.float32)
    assert all(pipe.components[n] is m for n, m in components.items()) and pipe.transformer is transformer
    torch.testing.assert_close(latents(pipe), latents(reference), rtol=0, atol=0)
