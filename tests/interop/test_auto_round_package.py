"""Our auto_round exports read by the real thing: transformers' auto-round integration and the auto-round
package's own torch QuantLinear (auto-round 0.16.1 from PyPI), compared on logits and weights.

auto-round's loader only handles layers whose in_features are a multiple of group_size: for SmolLM2
(576 inputs) at group size 128 it selects its "fake" backend and fails, on its own exports too
(ANCHORS.md). There we load our tensors into its torch QuantLinear with a g_idx (its GPTQ-style path,
which handles the partial last group) and compare outputs instead. That path has a bug of its own for
layers with more outputs than inputs (it slices the [G, N] scales by in_features), so the partial-group
check covers q/k/v/o (576 inputs) and down_proj, not gate/up (576 -> 1536).
"""

import pytest
import torch

import lowbit
from tests.conftest import save_tiny_llama

pytestmark = pytest.mark.interop
auto_round = pytest.importorskip("auto_round")


def transformers_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 64), (2, 32)])
def test_transformers_integration_matches_our_loader(tmp_path, sym, bits, group_size):
    src, out = tmp_path / "tiny", tmp_path / "q"
    save_tiny_llama(src)
    lowbit.quantize(str(src), "rtn", lowbit.Scheme(bits, group_size, sym), run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    theirs = transformers_load(out)
    layer = theirs.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("auto_round_extension"), type(layer)
    x = torch.randint(0, 512, (2, 32))
    ours = lowbit.load(out)(x).logits
    ref = theirs(x).logits.float()  # auto-round forces fp16 on the CPU
    rel = ((ours - ref).abs().max() / ours.abs().max()).item()
    print(f"W{bits} g{group_size} sym={sym}: max relative logit error vs auto-round via transformers {rel:.2e}")
    assert rel < 5e-3


@pytest.mark.slow
def test_smollm2_g64_loads_through_transformers(smollm2_cli_g64):
    out, run = smollm2_cli_g64  # `lowbit quantize default` W4 g64 asym auto_round
    assert run.returncode == 0, run.stderr
    x = torch.randint(0, 49152, (1, 64))
    ours = lowbit.load(out)(x).logits
    ref = transformers_load(out)(x).logits.float()
    rel = ((ours - ref).abs().max() / ours.abs().max()).item()
    print(f"SmolLM2 W4 g64 asym: max relative logit error vs auto-round via transformers {rel:.2e}")
    assert rel < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("sym", [False, True])
def test_smollm2_partial_group_through_auto_round_quantlinear(smollm2_rtn, sym):
    from safetensors import safe_open

    qlinear_module = "qlinear_torch_zp" if sym else "qlinear_torch"
    module = pytest.importorskip(f"auto_round_extension.torch.{qlinear_module}")
    out, _ = smollm2_rtn(4, 128, sym)
    ours = lowbit.load(out)
    # K=576: 4 full groups + a 64-wide one; down_proj K=1536: 12 full groups
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.12.self_attn.o_proj", "model.layers.29.mlp.down_proj"):
        mine = ours.get_submodule(name)
        theirs = module.QuantLinear(4, 128, mine.in_features, mine.out_features, bias=False, g_idx=True)
        with safe_open(out / "model.safetensors", "pt") as f:
            for buf in ("qweight", "qzeros", "scales"):
                getattr(theirs, buf).copy_(f.get_tensor(f"{name}.{buf}"))
        theirs.post_init()
        x = torch.randn(3, mine.in_features, dtype=torch.float16)
        want = theirs(x).float()
        got = torch.nn.functional.linear(x.float(), mine.dequantize_weight(torch.float32))
        rel = ((got - want).abs().max() / got.abs().max()).item()
        assert rel < 5e-3, (name, rel)
