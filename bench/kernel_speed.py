"""W4A16 (and W8) kernel benchmark: lowbit's Triton kernels vs fp16 cuBLAS vs torch's int4 tinygemm vs
AutoAWQ's Triton GEMM, over M and the Llama-3-8B/70B layer shapes. Checks correctness on the GPU first.

    PYTHONPATH=src python bench/kernel_speed.py [--shapes KxN ...] [--ms M ...] [--quick] [--sweep] [--bits 4] [--group-size 128]

"ours" is quant_matmul as users call it: the kernel table in force for this GPU (triton/table.py; a user table
under $LOWBIT_HOME/kernels first); "default_table" the default (H100) table's choice timed beside it.

--quick: 8192x28672, 28672x8192, 4096x4096 at M = 1, 4, 16, 32, 64, 1024: pick_config vs the previous heuristic
vs a few candidate configs of the new paths (GEMV, magic-number conversion); writes kernels-<date>-r2.json.

--sweep also times a grid of kernel configs per (shape, M) and records the best (to tune pick_config).
AutoAWQ's kernel is timed only when its file from the `autoawq` sdist sits at .cache/awq_triton/gemm.py
(ignored; never committed), called as AutoAWQ's WQLinear_GEMM calls it (split_k_iters=8; dequantize +
matmul for M >= 1024). Prints a table of speedups over fp16 last; writes bench/results/kernels-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, environment, write_json  # noqa: E402

from lowbit.export.auto_awq import pack_columns  # noqa: E402
from lowbit.kernels.triton import table as ktable  # noqa: E402
from lowbit.kernels.triton.dequant import dequantize  # noqa: E402
from lowbit.kernels.triton.dequant_gemm import DequantGemm  # noqa: E402
from lowbit.kernels.triton.matmul import Config, gemv_config, pick_config, quant_matmul  # noqa: E402
from lowbit.kernels.tune import dequant_ref, random_layer  # noqa: E402

MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
# (K, N) of Llama-3-8B (q/o 4096x4096, gate/up 4096x14336, down 14336x4096) and 70B
# (largest first: the targets are set on them, and a run cut short keeps them)
SHAPES = [(8192, 28672), (28672, 8192), (8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096)]
SWEEP_MIN_WEIGHTS = 8192 * 8192  # --sweep tunes on the large shapes only
ROOT = Path(__file__).resolve().parents[1]


def load_awq():
    path = ROOT / ".cache" / "awq_triton" / "gemm.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("awq_triton_gemm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Layer:
    """One random quantized layer in every format the benchmark compares."""

    def __init__(self, k: int, n: int, bits: int, group_size: int, seed: int = 0):
        gs = k if group_size == -1 else group_size
        self.k, self.n, self.bits, self.gs = k, n, bits, gs
        self.codes, self.zeros, self.scales, self.packed = random_layer(k, n, bits, gs, "cuda", seed)  # codes [K, N]
        self.w_fp16 = self.dequant().t().contiguous().half()  # [N, K], what nn.Linear holds

    def dequant(self) -> torch.Tensor:
        return dequant_ref(self.codes, self.zeros, self.scales, self.gs)  # [K, N] fp32

    def tinygemm(self):
        """torch int4 tinygemm (bf16 activations): packed weight and scale/zero tensor, or None."""
        if self.bits != 4:
            return None
        try:
            # tinygemm reads codes in [0, 16) with w = (q - 8) * scale + zero_bf16: zero' = (8 - z) * scale
            q = self.codes.t().contiguous()  # [N, K]
            u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2]
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
            sz = torch.stack([self.scales.float(), (8 - self.zeros.float()) * self.scales.float()], dim=-1).to(torch.bfloat16)  # [G, N, 2]
            return packed, sz.contiguous()
        except Exception as exc:  # noqa: BLE001 - report and go on without it
            print(f"tinygemm unavailable: {exc}")
            return None

    def awq(self):
        """AutoAWQ GEMM tensors: qweight [K, N/8], qzeros [G, N/8], scales [G, N]."""
        return pack_columns(self.codes.cpu()).cuda(), pack_columns(self.zeros.cpu()).cuda(), self.scales


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


def sweep_configs(m: int, bits: int):
    """Candidate configs per M regime (for --sweep): both unpack modes, tile widths, K splits."""
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        for split_unpack, bks in ((False, (128,)), (True, (512 // bits,))):
            for bn in (64, 128, 256):
                for bk in bks:
                    for split in (1, 2, 4, 8, 16):
                        yield Config(bm, bn, bk, split_k=split, num_warps=4 if bn < 256 else 8, num_stages=4, split_unpack=split_unpack)
    else:
        for bm, bn, bk, w, s in [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 8, 3)]:
            if bm <= max(64, m):
                yield Config(bm, bn, bk, num_warps=w, num_stages=s, scale_after_dot=False)
        for bm, bn in ((64, 128), (128, 128), (128, 256)):
            yield Config(bm, bn, 512 // bits, num_warps=8 if bm * bn > 8192 else 4, num_stages=3, scale_after_dot=False, split_unpack=True)
        yield None  # dequantize + cuBLAS


def old_config(m: int, n: int, k: int, bits: int, gs: int, sm: int):
    """pick_config as it was before the GEMV and the magic-number conversion (the r1 sweep's best at M <= 16)."""
    cfg = pick_config(m, n, k, bits, gs, sm)
    if m <= 16:
        chunks = -(-k // (512 // bits))
        split = 8
        while split > 1 and chunks // split < 4:
            split //= 2
        return Config(16, 128, 512 // bits, split_k=split, num_warps=4, num_stages=4, split_unpack=True)
    if isinstance(cfg, Config) and cfg.magic:
        return dataclasses.replace(cfg, magic=False)
    return cfg


def swap_candidates(m: int, n: int, k: int, sm: int) -> dict:
    """swapab.py tiles for this M: token tile (block_m) x weight-column tile (block_n), warps, and K splits
    giving >= 1 and >= 2 waves of programs; x reordered in torch (the default) and, once, in the kernel."""
    c = {}
    chunks = -(-k // 128)
    bm_fit = max(16, 1 << (m - 1).bit_length())
    # 16 warps on 256 columns: four warpgroups of one m64 row block each, 4 warps per scheduler to hide latency
    if m >= 1024:
        shapes = ((256, 128, 8), (128, 256, 16), (256, 256, 16))
    elif m > 128:
        shapes = ((256, 128, 8), (256, 256, 16))
    else:  # (r22 also timed 4 warps on 128 columns and 8 warps on 256: 10-40% slower at every M)
        shapes = ((bm_fit, 128, 8), (bm_fit, 256, 16))
    for bm, bn, warps in shapes:
        tiles = -(-m // bm) * -(-n // bn)
        split = 1
        while tiles * split < sm and split * 2 <= chunks // 2:
            split *= 2
        for s_ in sorted({split, min(split * 2, max(1, chunks // 2))}) if m < 1024 else (1,):
            name = f"swap_m{bm}_n{bn}_w{warps}_s{s_}"
            c[name] = Config(bm, bn, 128, split_k=s_, num_warps=warps, num_stages=3, swap_ab=True, x_permuted=True, in_kernel_reduce=False)
    if m <= 128:  # r22's best tile with 4 pipeline stages, and 64-column tiles of one warpgroup (several CTAs per SM)
        tiles = -(-m // bm_fit) * -(-n // 64)
        split = 1
        while tiles * split < 2 * sm and split * 2 <= chunks // 2:
            split *= 2
        c[f"swap_m{bm_fit}_n64_w4_s{split}"] = Config(bm_fit, 64, 128, split_k=split, num_warps=4, num_stages=3, swap_ab=True,
                                                      x_permuted=True, in_kernel_reduce=False)
        c[f"swap_m{bm_fit}_n64_w4_s{split}_st4"] = dataclasses.replace(c[f"swap_m{bm_fit}_n64_w4_s{split}"], num_stages=4)
        best = next(nm for nm in c if nm.startswith(f"swap_m{bm_fit}_n128_w8_"))
        c[best + "_st4"] = dataclasses.replace(c[best], num_stages=4)
    if m <= 128:  # registers capped for two 8-warp programs per SM (r26: the pipelined wgmmas need 162 at 64 tokens)
        for bm in (min(bm_fit, 64),):
            tiles = -(-m // bm) * -(-n // 128)
            splits = []
            for waves in (1, 2):  # the smallest power-of-two K split giving one / two programs per SM
                split = 1
                while tiles * split < waves * sm and split * 2 <= chunks // 2:
                    split *= 2
                splits.append(split)
            for split in sorted(set(splits)):
                c[f"swap_m{bm}_n128_w8_s{split}_r128"] = Config(bm, 128, 128, split_k=split, num_warps=8, num_stages=3, swap_ab=True,
                                                               x_permuted=True, in_kernel_reduce=False, max_registers=128)
            if bm <= 32:  # three programs per SM (80 registers: spills 12-52 bytes)
                c[f"swap_m{bm}_n128_w8_s{splits[1]}_r80"] = dataclasses.replace(c[f"swap_m{bm}_n128_w8_s{splits[1]}_r128"], max_registers=80)
    first = next(iter(c))
    c[first + "_xin"] = dataclasses.replace(c[first], x_permuted=False)  # x reordered in the kernel
    if m < 1024 and c[first].split_k > 1:
        c[first + "_ik"] = dataclasses.replace(c[first], in_kernel_reduce=True)  # K splits met inside the launch
    return c


def quick_candidates(m: int, n: int, k: int, bits: int, gs: int, sm: int) -> dict:
    """Configs timed beside pick_config's in --quick mode (the new paths and their nearest variants)."""
    c = {}
    if m <= 16:
        if m <= 4:
            c["gemv"] = gemv_config(m, n, k, sm)
            c["gemv_split_x2"] = dataclasses.replace(gemv_config(m, n, k, sm), split_k=gemv_config(m, n, k, sm).split_k * 2)
            if m == 1:
                c["gemv_bn256_w2"] = gemv_config(m, n, k, sm, block_n=256, num_warps=2)
                c["gemv_bn1024_w8"] = gemv_config(m, n, k, sm, block_n=1024, num_warps=8)
            else:
                c["gemv_bn1024_w8"] = gemv_config(m, n, k, sm, block_n=1024, num_warps=8)
                c["gemv_bn512_w4"] = gemv_config(m, n, k, sm, num_warps=4)
        if m <= 4:
            c["split_unpack_magic"] = dataclasses.replace(old_config(m, n, k, bits, gs, sm), magic=True)
        else:
            c["split_unpack_magic_s4"] = dataclasses.replace(old_config(m, n, k, bits, gs, sm), magic=True, split_k=4)
        c["split_unpack_magic_s16"] = dataclasses.replace(old_config(m, n, k, bits, gs, sm), magic=True, split_k=16)
    elif m <= 64:
        base = pick_config(m, n, k, bits, gs, sm)
        c["reshape_magic_bn128_s4"] = dataclasses.replace(base, block_n=128, split_k=4, num_warps=8, num_stages=3)
        c["split_unpack_magic_bn128"] = Config(64, 128, 512 // bits, split_k=2, num_warps=8, num_stages=3, split_unpack=True, magic=True)
        c["split_unpack_magic_bn64"] = Config(64, 64, 512 // bits, split_k=4, num_warps=4, num_stages=4, split_unpack=True, magic=True)
        if bits == 4 and m <= 32 and isinstance(base, Config) and base.x_once:
            for per_sm in (1, 2, 3):
                c[f"ours_streamk{per_sm}"] = dataclasses.replace(base, stream_k=per_sm, in_kernel_reduce=True)
        if bits == 4 and m <= 32:  # the split form with x loaded once, 32-row tiles (pick_config's since r11: s8)
            for bn, warps, split in ((128, 4, 4), (128, 4, 16), (256, 8, 8)):
                c[f"unpack4_xonce_m32_bn{bn}_w{warps}_s{split}"] = Config(32, bn, 128, split_k=split, num_warps=warps, num_stages=3,
                                                                         split_unpack=True, unpack4=True, x_once=True)
        if bits == 4 and m > 32:  # the same with 64-row tiles
            for bn, warps, split in ((64, 4, 8), (128, 4, 4), (128, 4, 8), (128, 8, 8)):
                c[f"unpack4_xonce_m64_bn{bn}_w{warps}_s{split}"] = Config(64, bn, 128, split_k=split, num_warps=warps, num_stages=3,
                                                                         split_unpack=True, unpack4=True, x_once=True)
                c[f"unpack4_xonce_m64_bn{bn}_w{warps}_s{split}_3l"] = dataclasses.replace(
                    c[f"unpack4_xonce_m64_bn{bn}_w{warps}_s{split}"], in_kernel_reduce=False)
        if bits == 4:  # unpack4 interleaved back into k order: one deep dot per chunk
            for bm, bn, warps, split in ((32, 128, 4, 4), (64, 128, 4, 4), (64, 128, 8, 4), (64, 256, 8, 2), (64, 256, 8, 4)):
                c[f"unpack4_join_m{bm}_bn{bn}_w{warps}_s{split}"] = Config(bm, bn, 128, split_k=split, num_warps=warps, num_stages=3, unpack4=True)
    elif m >= 1024:  # dequantize + cuBLAS in column slabs (dequant_gemm.py), sequential or overlapped
        # (the fused unpack4 GEMMs timed here in r8 reached 0.14-0.36x fp16: dropped)
        c["dequant_cublas"] = DequantGemm()  # the whole weight at once
        for slab in (1024, 2048, 4096, 8192):
            if slab < n:
                c[f"dequant_slab{slab}"] = DequantGemm(slab)
                c[f"dequant_slab{slab}_overlap"] = DequantGemm(slab, overlap=True)
    elif m > 128:  # between the small-M paths and dequantize + cuBLAS in slabs: the two older large-M paths
        c["dequant_cublas"] = DequantGemm()
        c["tiled_gemm"] = Config(128, 128, 64, split_k=1, num_warps=4, num_stages=4, scale_after_dot=False)
    if bits == 4 and m > 8:  # swapab.py: the weight as the wgmma's register operand
        c.update(swap_candidates(m, n, k, sm))
    ours = pick_config(m, n, k, bits, gs, sm)
    if isinstance(ours, Config) and ours.stream_k:  # the same tile with the K split instead of stream-K
        c["ours_ksplit"] = dataclasses.replace(ours, stream_k=0, in_kernel_reduce=m <= 8)
    if m <= 16 and bits == 4:  # unpack4.py: two codes per instruction (inline PTX)
        for bn, warps in ((128, 4), (256, 4), (256, 8)):
            tiles = -(-n // bn)
            split = 1
            while tiles * split < 3 * sm and split * 2 <= min(-(-k // 128), 64):
                split *= 2
            c[f"unpack4_bn{bn}_w{warps}"] = Config(16, bn, 128, split_k=split, num_warps=warps, num_stages=3, split_unpack=True, unpack4=True)
        for bn in (128, 256):
            c[f"unpack4_xonce_bn{bn}_w4"] = dataclasses.replace(c[f"unpack4_bn{bn}_w4"], x_once=True)
        ours = pick_config(m, n, k, bits, gs, sm)
        if isinstance(ours, Config) and ours.x_once:  # pick_config's K split halved and doubled
            for f in (0.5, 2):
                c[f"ours_split_x{f}"] = dataclasses.replace(ours, split_k=max(1, int(ours.split_k * f)))
            # (4-6 pipeline stages were timed here in r19: never above 3)
            for per_sm in (1, 2, 3, 4):  # stream-K: per_sm programs per SM share tiles x chunks evenly
                c[f"ours_streamk{per_sm}"] = dataclasses.replace(ours, stream_k=per_sm, in_kernel_reduce=True)
        c["unpack4_bn128_w4_s2"] = Config(16, 128, 128, split_k=c["unpack4_bn128_w4"].split_k * 2, num_warps=4, num_stages=3,
                                          split_unpack=True, unpack4=True)
    return c


def quick(args):
    """--quick: 3 shapes x M in 1, 4, 16, 64, 1024; pick_config ('ours') vs the previous heuristic ('old')
    vs candidate configs, all checked against an fp32 reference first. Writes kernels-<date>-r2.json."""
    import datetime
    import json
    import os
    import shutil

    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else [(8192, 28672), (28672, 8192), (4096, 4096)]
    ms = args.ms or [1, 4, 16, 32, 64, 1024]
    awq = load_awq() if args.bits == 4 else None
    timer = Timer()
    tm = (lambda fn: timer(fn, graph=False)) if args.eager else timer  # noqa: E731 - --eager: launch by launch
    env = environment()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    path = ROOT / "bench" / "results" / f"kernels-{datetime.date.today().isoformat()}-r2.json"
    for k, n in shapes:
        layer = Layer(k, n, args.bits, args.group_size)
        tg = layer.tinygemm()
        aw = layer.awq() if awq else None
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            xb = x.bfloat16()
            ref = x.float() @ layer.dequant()
            ours, old = pick_config(m, n, k, args.bits, layer.gs, sm), old_config(m, n, k, args.bits, layer.gs, sm)
            row = {"K": k, "N": n, "M": m, "ours_cfg": repr(ours), "old_cfg": repr(old), "err": {}, "cand_us": {}, "cand_cfg": {}}
            row["fp16_us"] = tm(lambda: F.linear(x, layer.w_fp16))
            try:
                row["err"]["ours"] = rel_err(quant_matmul(x, layer.packed, config=ours), ref)
                row["err"]["ours_bf16"] = rel_err(quant_matmul(xb, layer.packed, config=ours), ref)
                row["ours_us"] = tm(lambda: quant_matmul(x, layer.packed))
                if isinstance(ours, Config) and ours.split_k > 1:  # same config, K splits reduced the other way
                    other = "ours_3launch" if ours.in_kernel_reduce else "ours_in_kernel"
                    row["cand_us"][other] = tm(lambda: quant_matmul(x, layer.packed, in_kernel_reduce=not ours.in_kernel_reduce))
            except Exception as exc:  # noqa: BLE001 - keep the other columns
                row["err"]["ours"] = float("inf")
                print(f"ours {ours} failed: {str(exc)[:500]}", flush=True)
            row["err"]["old"] = rel_err(quant_matmul(x, layer.packed, config=old), ref)
            row["old_us"] = tm(lambda: quant_matmul(x, layer.packed, config=old))
            if tg and m < 1024:
                row["tinygemm_us"] = tm(lambda: torch.ops.aten._weight_int4pack_mm(xb, tg[0], layer.gs, tg[1]))
            if aw and m < 1024:
                row["awq_us"] = tm(lambda: awq_call(awq, x, aw, m))
            if m >= 1024:  # the dequantize pass alone (not a matmul: its "speedup" is fp16 GEMM time / dequantize time)
                row["cand_us"]["dequantize_alone"] = tm(lambda: dequantize(layer.packed, torch.float16))
            for name, cfg in quick_candidates(m, n, k, args.bits, layer.gs, sm).items():
                if args.cands and not name.startswith(tuple(args.cands)):
                    continue
                try:
                    row["err"][name] = rel_err(quant_matmul(x, layer.packed, config=cfg), ref)
                    if isinstance(cfg, Config) and (cfg.unpack4 or cfg.swap_ab):  # its bf16 assembly too
                        row["err"][name + "_bf16"] = rel_err(quant_matmul(xb, layer.packed, config=cfg), ref)
                    row["cand_us"][name] = tm(lambda: quant_matmul(x, layer.packed, config=cfg))
                    row["cand_cfg"][name] = repr(cfg)
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported and skipped
                    print(f"{name} {cfg} failed: {str(exc)[:300]}", flush=True)
            rows.append(row)
            print({kk: v for kk, v in row.items() if kk not in ("ours_cfg", "old_cfg", "cand_cfg")}, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            bad = [r for r in rows if max(r["err"].values()) > 1.5e-2 or r["err"]["ours"] > 3e-3]
            payload = {"env": env, "bits": args.bits, "group_size": args.group_size, "rows": rows, "failed_checks": bad,
                       "command": "PYTHONPATH=src python3 bench/kernel_speed.py " + " ".join(sys.argv[1:])}
            path.write_text(json.dumps(payload, indent=1))
            if os.environ.get("OUT"):
                shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        del layer, tg, aw
        torch.cuda.empty_cache()
    print(f"\nW{args.bits}A16 g{args.group_size}, speedup over fp16 cuBLAS, {'eager calls' if args.eager else 'CUDA-graph replays'}, median of 40, L2 flushed; "
          f"{env['gpus'][0]}, {env['date']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'KxN':>12} {'M':>5} {'fp16 us':>8} {'ours':>6} {'old':>6} {'tinyg':>6} {'awq':>6}  best candidate / all candidates")
    for r in rows:
        sp = lambda key: f"{r['fp16_us'] / r[key]:6.2f}" if key in r else f"{'-':>6}"  # noqa: E731
        cands = sorted(r["cand_us"].items(), key=lambda kv: kv[1])
        cs = " ".join(f"{nm}={r['fp16_us'] / t:.2f}" for nm, t in cands)
        print(f"{r['K']:>5}x{r['N']:<6} {r['M']:>5} {r['fp16_us']:8.1f} {sp('ours_us')} {sp('old_us')} {sp('tinygemm_us')} {sp('awq_us')}  {cs}")
    if bad:
        print(f"CORRECTNESS FAILED in {len(bad)} rows: {[(r['K'], r['N'], r['M'], r['err']) for r in bad[:3]]}")
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", help="only these M")
    ap.add_argument("--eager", action="store_true", help="--quick: time eager calls, not CUDA-graph replays (prefill outside a graph)")
    ap.add_argument("--shapes", nargs="+", help="these KxN layers (e.g. 8192x8192) instead of the default ones")
    ap.add_argument("--cands", nargs="+", help="--quick: only the candidates whose names start with these")
    ap.add_argument("--quick", action="store_true", help="3 shapes, M in 1/4/16/64/1024, ours vs old heuristic vs candidates")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    if args.quick:
        return quick(args)
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # cuBLAS default
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    ms = args.ms or MS
    default = ktable.default_table()  # the H100 choices, timed beside the table in force on this GPU
    in_force = ktable.for_device(torch.cuda.get_device_name(0))
    awq = load_awq() if args.bits == 4 else None
    timer = Timer()
    env = environment()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows, checks = [], []
    for k, n in shapes:
        layer = Layer(k, n, args.bits, args.group_size)
        tg = layer.tinygemm()
        aw = layer.awq() if awq else None
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            xb = x.bfloat16()
            ref = x.float() @ layer.dequant()  # [M, N] fp32 reference
            row = {"K": k, "N": n, "M": m}
            # correctness first, on this very input
            err = {"ours": rel_err(quant_matmul(x, layer.packed), ref), "ours_bf16": rel_err(quant_matmul(xb, layer.packed), ref)}
            if tg:
                err["tinygemm"] = rel_err(torch.ops.aten._weight_int4pack_mm(xb, tg[0], layer.gs, tg[1]), ref)
            if aw:
                awq_out = awq_call(awq, x, aw, m)
                err["awq"] = rel_err(awq_out, ref)
            checks.append({"K": k, "N": n, "M": m, **err})
            # timings (microseconds)
            row["fp16_us"] = timer(lambda: F.linear(x, layer.w_fp16))
            row["ours_us"] = timer(lambda: quant_matmul(x, layer.packed))
            row["ours_eager_us"] = timer(lambda: quant_matmul(x, layer.packed), graph=False)
            ours_cfg = pick_config(m, n, k, args.bits, layer.gs, sm)
            row["ours_cfg"], row["table"] = repr(ours_cfg), in_force.source
            default_cfg = pick_config(m, n, k, args.bits, layer.gs, sm, table=default)
            if repr(default_cfg) != repr(ours_cfg):  # the same launch otherwise: its time is ours_us
                checks[-1]["default_table"] = rel_err(quant_matmul(x, layer.packed, config=default_cfg), ref)
                row["default_table_us"] = timer(lambda: quant_matmul(x, layer.packed, config=default_cfg))
                row["default_table_cfg"] = repr(default_cfg)
            else:
                row["default_table_us"] = row["ours_us"]
            if tg:
                row["tinygemm_us"] = timer(lambda: torch.ops.aten._weight_int4pack_mm(xb, tg[0], layer.gs, tg[1]))
            if aw:
                row["awq_us"] = timer(lambda: awq_call(awq, x, aw, m))
            if args.sweep and k * n >= SWEEP_MIN_WEIGHTS:
                best = (float("inf"), None)
                for cfg in sweep_configs(m, args.bits):
                    try:
                        t = timer(lambda: quant_matmul(x, layer.packed, config=cfg))
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile is skipped
                        print(f"config {cfg} failed: {str(exc)[:200]}")
                        continue
                    best = min(best, (t, repr(cfg)), key=lambda b: b[0])
                row["best_us"], row["best_cfg"] = best
                if best[1] is not None:
                    cfg = eval(best[1], {"Config": Config, "None": None})  # noqa: S307 - our own repr
                    row["best_err"] = rel_err(quant_matmul(x, layer.packed, config=cfg), ref)  # the winner must be right too
            rows.append(row)
            print(row, {key: f"{v:.1e}" for key, v in err.items()}, flush=True)
        del layer, tg, aw
        torch.cuda.empty_cache()
        bad = [c for c in checks if c["ours"] > 3e-3 or c["ours_bf16"] > 1.5e-2 or c.get("default_table", 0) > 3e-3]
        write_json("kernels", {"env": env, "bits": args.bits, "group_size": args.group_size, "rows": rows, "checks": checks, "failed_checks": bad})
    print_table(rows, env, args)
    if bad:
        print(f"CORRECTNESS FAILED in {len(bad)} cases: {bad[:3]}")
        sys.exit(1)


def awq_call(awq, x, aw, m):
    qweight, qzeros, scales = aw
    if m >= 1024:  # AutoAWQ's WQLinear_GEMM: dequantize + matmul from 1024 tokens on
        return torch.matmul(x, awq.awq_dequantize_triton(qweight, scales, qzeros).to(x.dtype))
    return awq.awq_gemm_triton(x, qweight, scales, qzeros, split_k_iters=8)


def print_table(rows, env, args):
    cols = ["ours", "default_table", "ours_eager", "best", "tinygemm", "awq"]
    print(f"\nW{args.bits}A16 g{args.group_size}, speedup over fp16 cuBLAS (F.linear), CUDA-graph replays, median, L2 flushed; {env['gpus'][0]}, {env['date']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'KxN':>12} {'M':>5} {'fp16 us':>9} " + " ".join(f"{c:>10}" for c in cols))
    for r in rows:
        cells = [f"{r['fp16_us'] / r[c + '_us']:10.2f}" if c + "_us" in r else f"{'-':>10}" for c in cols]
        print(f"{r['K']:>5}x{r['N']:<6} {r['M']:>5} {r['fp16_us']:9.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
