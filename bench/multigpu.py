"""Two-GPU correctness: a quantized model split over two GPUs gives the logits it gives on one GPU, and a
layer whose weight and input sit on cuda:1 runs while cuda:0 is current.

    PYTHONPATH=src python bench/multigpu.py [--workdir /tmp/lowbit-mgpu]

Builds a random Llama with transformers (LlamaConfig + from_config), quantizes it with lowbit RTN
(W4 g128 asym) on the CPU, loads it with device_map="auto" and a max_memory that forces a split, and on
cuda:0 alone. Prints a table last; writes bench/results/multigpu-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

import lowbit  # noqa: E402
from lowbit.kernels.linear import QuantLinear  # noqa: E402
from lowbit.kernels.triton.matmul import pick_config  # noqa: E402


def build_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)


def quant_layers_by_device(model) -> dict[str, int]:
    count: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            count[str(module.qweight.device)] = count.get(str(module.qweight.device), 0) + 1
    return count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lowbit-mgpu")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs two CUDA GPUs")
    work = Path(args.workdir)
    src, out = work / "fp", work / "w4"
    if not (out / "config.json").exists():
        build_model(src)
        lowbit.quantize(str(src), "rtn", lowbit.Scheme(4, 128, False), run=lowbit.RunConfig(output_dir=str(out), device="cpu", overwrite=True), progress=False)

    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(1))
    results = {}

    torch.cuda.set_device(0)
    one = lowbit.load(out, device_map="cuda:0", dtype=torch.float16)
    with torch.no_grad():
        logits_one = one(ids.to("cuda:0")).logits.float().cpu()
        # the same forward again: K splits met with fp32 atomics (swap AB at these 96 tokens) add their
        # partial sums in whatever order the programs finish, so two runs on one GPU may differ by fp16 rounding
        logits_again = one(ids.to("cuda:0")).logits.float().cpu()
    results["one_gpu_repeat_rel_diff"] = ((logits_again - logits_one).norm() / logits_one.norm()).item()
    results["one_gpu_layers"] = quant_layers_by_device(one)
    del one
    torch.cuda.empty_cache()

    # The fp16 model is ~21 MiB (embeddings 4, lm_head 4, 1.6 per block): 12 MiB on cuda:0 (less the
    # largest layer accelerate keeps in reserve) holds the embeddings and a few blocks; cuda:1 the rest.
    split = lowbit.load(out, device_map="auto", max_memory={0: "12MiB", 1: "40MiB", "cpu": "1GiB"}, dtype=torch.float16)
    results["device_map"] = {k: str(v) for k, v in split.hf_device_map.items()}
    results["split_layers"] = quant_layers_by_device(split)
    with torch.no_grad():
        logits_split = split(ids.to("cuda:0")).logits.float().cpu()
    results["max_abs_diff"] = (logits_split - logits_one).abs().max().item()
    results["rel_diff"] = ((logits_split - logits_one).norm() / logits_one.norm()).item()
    results["argmax_agree"] = (logits_split.argmax(-1) == logits_one.argmax(-1)).float().mean().item()
    del split
    torch.cuda.empty_cache()

    # CPU torch path of the same export, fp32: the GPU kernels agree with it up to fp16 rounding
    cpu = lowbit.load(out, device_map=None, dtype=torch.float32)
    with torch.no_grad():
        logits_cpu = cpu(ids).logits
    results["gpu_vs_cpu_rel_diff"] = ((logits_one - logits_cpu).norm() / logits_cpu.norm()).item()

    # one layer on cuda:1 while cuda:0 is current, every kernel regime pick_config has for it (M = 1 GEMV,
    # 8 unpack4 dot with the K split met in the launch, 40 / 64 swap AB, 200 / 2048 dequantize + cuBLAS)
    layer = next(m for m in cpu.modules() if isinstance(m, QuantLinear))
    w_ref = layer.dequantize_weight(torch.float64)  # [N, K]
    layer = layer.to("cuda:1")
    torch.cuda.set_device(0)
    cross = {}
    for m in (1, 8, 40, 64, 200, 2048):
        x = torch.randn(m, layer.in_features).half()
        y = layer(x.to("cuda:1"))
        ref = x.double() @ w_ref.t()
        cfg = pick_config(m, layer.out_features, layer.in_features, layer.bits, layer.group_size,
                          torch.cuda.get_device_properties(1).multi_processor_count)
        cross[m] = {"device": str(y.device), "rel_err": ((y.double().cpu() - ref).norm() / ref.norm()).item(), "config": repr(cfg)}
    results["cuda1_while_cuda0_current"] = cross

    ok = (
        len([d for d in results["split_layers"] if d.startswith("cuda")]) == 2
        and results["rel_diff"] < 1e-3  # fp16 rounding of a differently ordered split-K sum, at most
        and all(c["device"] == "cuda:1" and c["rel_err"] < 2e-3 for c in cross.values())
        and results["gpu_vs_cpu_rel_diff"] < 2e-2
    )
    results["ok"] = ok
    write_json("multigpu", {"env": environment(), **results})
    print(f"\n2-GPU check on {environment()['gpus']}:")
    print(f"{'check':<44} {'value'}")
    print(f"{'quant layers per device (split)':<44} {results['split_layers']}")
    print(f"{'split vs one GPU: rel diff of logits':<44} {results['rel_diff']:.2e} (max abs {results['max_abs_diff']:.2e})")
    print(f"{'split vs one GPU: argmax agreement':<44} {results['argmax_agree']:.4f}")
    print(f"{'one GPU twice: rel diff of logits':<44} {results['one_gpu_repeat_rel_diff']:.2e}")
    print(f"{'one GPU (fp16) vs CPU torch path (fp32)':<44} {results['gpu_vs_cpu_rel_diff']:.2e}")
    for m, c in cross.items():
        print(f"{f'layer on cuda:1, cuda:0 current, M={m}':<44} {c['device']} rel err {c['rel_err']:.2e}  {c['config'][:90]}")
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
