"""Scale check for VLMs: random-weight checkpoints shaped like gemma-4-31B-it and Qwen3-VL-32B (their text
blocks at the real shapes, vision towers included), quantized with the lowbit CLI (RTN, then AutoRound with
few iterations on 128 x 2048 tokens), peak RSS / VRAM and time per block from each run's summary.

The checkpoints are written tensor by tensor from the skeleton's shapes (meta model, never the whole model in
RAM). A single H200 has 64 GB of disk, too little for a 31B checkpoint plus its output: `--blocks` writes
fewer blocks of the real shapes (peak RAM depends on the block, not on the depth). The calibration text is a
file (`--text`) and its tokenizer a BPE trained on it here (the GPU machine reaches no hub).

    python bench/vlm_scale.py --text .cache/austen.txt --blocks 10 --workdir /tmp/vlm [--models gemma4,qwen3vl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def gemma4_31b(blocks: int, tiny: bool = False):
    """gemma-4-31B-it's shapes (as published: 60 layers, hidden 5376, MLP 21504, 32 heads of 256, 16 KV
    heads, full-attention layers with 512-wide heads and K = V, sliding window 1024, vocab 262144) and a
    ~0.55B-parameter vision tower; `blocks` of the 60 layers."""
    from transformers import Gemma4Config

    layer_types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(blocks)]
    layer_types[-1] = "full_attention"
    text = dict(
        model_type="gemma4_text", vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=blocks,
        num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512, num_global_key_value_heads=4,
        attention_k_eq_v=True, sliding_window=1024, layer_types=layer_types, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, tie_word_embeddings=True,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72)
    if tiny:
        text.update(TINY_TEXT, global_head_dim=64, num_global_key_value_heads=2)
        vision.update(TINY_VISION, num_hidden_layers=1, num_key_value_heads=2, head_dim=32)
    config = Gemma4Config(text_config=text, vision_config=vision)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


def qwen3_vl_32b(blocks: int, tiny: bool = False):
    """Qwen3-VL-32B's shapes (64 layers, hidden 5120, MLP 25600, 64 heads of 128, 8 KV heads, vocab
    151936; vision: 27 blocks of 1152); `blocks` of the 64 layers."""
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=blocks, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=5120, deepstack_visual_indexes=[8, 16, 24])
    if tiny:
        text.update(TINY_TEXT)
        vision.update(TINY_VISION, depth=1, num_heads=2, out_hidden_size=256, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def write_random_checkpoint(config, path: Path, shard_bytes: int = 4 << 30) -> int:
    """Every tensor of the model's state dict, random bf16 (norm weights near 1), written in shards."""
    from common import write_random_shards

    from lowbit.model.skeleton import build_skeleton

    path.mkdir(parents=True, exist_ok=True)
    config.dtype = "bfloat16"
    config.save_pretrained(path)
    skeleton = build_skeleton(config, dtype=torch.bfloat16)
    return write_random_shards(skeleton.state_dict(keep_vars=True).items(), path, "model", shard_bytes)


def write_tokenizer(path: Path, text: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


TINY_TEXT = dict(hidden_size=256, intermediate_size=512, vocab_size=8192, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)


def quantize(ckpt: Path, out: Path, extra: list[str], device: str = "cuda", keep: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(ckpt), "--scheme", "W4A16", "--group_size", "128", "--sym",
           "--format", "auto_round", "--output_dir", str(out), "--device", device, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    log = json.loads((out / "lowbit_log.json").read_text())
    if not keep:
        shutil.rmtree(out, ignore_errors=True)  # the disk holds one output at a time
    return {"wall_s": round(wall, 1), "seconds": log["seconds"], "peak_rss_gib": round(log["peak_rss_bytes"] / 2**30, 2),
            "peak_vram_gib": {d: round(b / 2**30, 2) for d, b in log["peak_vram_bytes"].items()},
            "quantized": len(log["quantized"]), "kept_fp": len(log["kept_fp"]), "experts_rtn": len(log.get("experts_rtn_fallback", {}))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True, help="calibration text (UTF-8)")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--workdir", default="/tmp/vlm-scale")
    p.add_argument("--models", default="gemma4,qwen3vl")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy widths: a smoke test of this script on the CPU")
    args = p.parse_args()
    work = Path(args.workdir)
    builders = {"gemma4": gemma4_31b, "qwen3vl": qwen3_vl_32b}
    text = Path(args.text).read_text(encoding="utf-8")
    rows = {}
    for name in args.models.split(","):
        ckpt = work / name
        shutil.rmtree(ckpt, ignore_errors=True)
        t0 = time.time()
        nbytes = write_random_checkpoint(builders[name](args.blocks, args.tiny), ckpt)
        write_tokenizer(ckpt, text)
        print(f"{name}: wrote {nbytes / 2**30:.1f} GiB in {time.time() - t0:.0f} s", flush=True)
        rows[name] = {"checkpoint_gib": round(nbytes / 2**30, 2), "blocks": args.blocks}
        rows[name]["rtn"] = quantize(ckpt, work / "out", ["--method", "rtn"], args.device)
        rows[name]["autoround"] = quantize(ckpt, work / "out", ["--method", "autoround", "--iters", str(args.iters), "--nsamples", str(args.nsamples),
                                                                 "--seqlen", str(args.seqlen), "--batch_size", "8", "--dataset", args.text,
                                                                 "--disable_torch_compile"], args.device)  # 2 iterations: compiling costs more than it saves
        shutil.rmtree(ckpt, ignore_errors=True)
    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import transformers

    env["transformers"] = transformers.__version__
    result = {"env": env, "args": vars(args), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"vlm-scale-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'model':10} {'ckpt GiB':>8} {'method':10} {'time s':>7} {'s/block':>8} {'RSS GiB':>8} {'VRAM GiB':>9}")
    for name, row in rows.items():
        for method in ("rtn", "autoround"):
            r = row[method]
            if "error" in r:
                print(f"{name:10} {row['checkpoint_gib']:8.1f} {method:10} ERROR {r['error']}")
                continue
            vram = max(r["peak_vram_gib"].values() or [0])
            print(f"{name:10} {row['checkpoint_gib']:8.1f} {method:10} {r['seconds']:7.1f} {r['seconds'] / row['blocks']:8.2f} {r['peak_rss_gib']:8.2f} {vram:9.2f}")


if __name__ == "__main__":
    main()
