"""Our quantized pipeline's transformer read by the real thing: diffusers' own AutoRound quantizer (diffusers
0.42.1, `FluxTransformer2DModel.from_pretrained` on the auto_round export, which calls the auto-round 0.16.1
package's loader and its torch QuantLinear), against lowbit.load_pipeline's transformer at the same dtype.

auto-round's torch backends compute in 16 bits only (its post_init casts the model), so both sides run in
fp16 on the CPU; measured: 3.6e-4 relative difference of the transformer's output (W4 g32 sym and asym)."""

import pytest
import torch

import lowbit
from lowbit.diffusion import load_pipeline, quantize_pipeline
from tests.arch.test_capture_diffusion import flux_inputs
from tests.diffusion_tiny import save_tiny_flux_pipeline

pytestmark = pytest.mark.interop
pytest.importorskip("auto_round")


@pytest.mark.parametrize("sym", [True, False])
def test_diffusers_auto_round_loader_matches_load_pipeline(tmp_path, sym):
    from diffusers import FluxTransformer2DModel

    pipeline = save_tiny_flux_pipeline(tmp_path / "flux")
    out = tmp_path / "out"
    quantize_pipeline(str(pipeline), "rtn", lowbit.Scheme(4, 32, sym), run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    peer = FluxTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float16)
    assert type(peer.transformer_blocks[0].attn.to_q).__module__.startswith("auto_round")
    ours = load_pipeline(out, dtype=torch.float16).transformer
    inputs = {k: v.half() for k, v in flux_inputs(torch.Generator().manual_seed(0), 2).items()}
    with torch.no_grad():
        a, b = peer(**inputs).sample.float(), ours(**inputs).sample.float()
    assert ((a - b).norm() / b.norm()).item() < 2e-3
