"""`lowbit tune-kernels` (or `python -m lowbit.kernels.tune`): time the candidate kernel configs on this GPU and
write its kernel table (triton/table.py) to `$LOWBIT_HOME/kernels/<gpu>.json`, which then takes precedence.

For each layer shape (K x N) and M it builds a random W4 layer, checks every candidate against an fp32
reference (a candidate off by more than 3e-3 is dropped, and said so), times it with CUDA-graph replays, L2
flushed, median of 40 (as bench/kernel_speed.py does), and writes one row per (M bucket, shape): the
fastest candidates first, except that the default table's choice (timed too) stays first unless beaten by
more than MARGIN. A row's M bucket runs from the previous tuned M + 1 up to its M (the last one
without end); a layer not tuned takes the rows of the nearest tuned shape (log2 distance in K and N), and
layers no entry can read (other bits and groups) take the default table's choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the Llama-3-8B layers (q/k/v fused, o, gate, down) and the 70B-sized ones of docs/kernels.md
DEFAULT_SHAPES = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
DEFAULT_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
MAX_ERR = 3e-3  # fp16 activations, fp32 accumulation: picked configs land near 3e-4
KEEP = 3  # entries kept per row, fastest first
# The default table's choice stays first unless a candidate beats it by more than this: the same cell moves by
# up to ~5% between runs (H200 r1/r2, 2026-11-30), and a pick decided by noise only makes the table harder to read.
MARGIN = 0.03


def candidates(m: int) -> list[dict]:
    """Table entries worth timing at M tokens: each path today's tables use, with its nearest variants."""
    ikr = m <= 8  # K splits met in the launch (splitk.py): won at M <= 8 on the H100 (r11-r13)
    c = []
    if m <= 4:
        c += [{"kernel": "gemv", "per_sm": p} for p in (8, 4, 16)]
    if m <= 16:
        c += [{"kernel": "unpack4", "per_sm": p, "in_kernel_reduce": ikr} for p in (1.5, 0.75, 3)]
        c += [{"kernel": "unpack4", "stream_k": s, "in_kernel_reduce": True} for s in (1, 2, 4)]
        # registers capped so more programs share an SM: uncapped the unpack4 dot takes 218 per thread, two 4-warp
        # programs per SM, and issues on ~2 warps per scheduler at 48% of DRAM bandwidth (H200 ncu, 2026-11-30);
        # 168 fits three programs, 128 four
        c += [{"kernel": "unpack4", "max_registers": r, "stream_k": s, "in_kernel_reduce": True} for r, s in ((168, 3), (128, 4))]
        c += [{"kernel": "unpack4", "max_registers": r, "per_sm": p, "in_kernel_reduce": ikr} for r, p in ((168, 3), (128, 4))]
        c += [{"kernel": "magic_split", "in_kernel_reduce": ikr}]
    elif m <= 64:
        c += [{"kernel": "swap_ab", "in_kernel_reduce": False}, {"kernel": "swap_ab", "per_sm": 2, "in_kernel_reduce": False},
              {"kernel": "unpack4", "block_m": 32 if m <= 32 else 64, "block_n": 128, "split_k": 8, "min_chunks": 2, "stream_k": 2,
               "in_kernel_reduce": True},
              {"kernel": "unpack4_join", "in_kernel_reduce": False}]
    elif m < 1024:
        c += [{"kernel": "swap_ab", "in_kernel_reduce": False}, {"kernel": "swap_ab", "per_sm": 2, "in_kernel_reduce": False},
              {"kernel": "dequant"}]
    else:
        c += [{"kernel": "dequant"}, {"kernel": "dequant", "slab_n": 2048, "overlap": True}, {"kernel": "dequant", "slab_n": 4096, "overlap": True}]
    return c


def random_layer(k: int, n: int, bits: int, group_size: int, device, seed: int = 0):
    """Random codes int32 [K, N], zeros int32 [G, N], scales fp16 [G, N] and their `Packed` layout."""
    import torch

    from ..quant.pack import pack_bitstream
    from .repack import Packed

    g = torch.Generator(device=device).manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=g, device=device, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g, device=device, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g, device=device) * 0.01 + 0.001).half()
    return codes, zeros, scales, Packed(pack_bitstream(codes, bits, dim=0), scales, zeros.half(), bits, group_size)


def dequant_ref(codes, zeros, scales, group_size: int):
    """fp32 W^T [K, N] = (codes - zeros) * scales, groups along K."""
    import torch

    group = torch.arange(codes.shape[0], device=codes.device) // group_size
    return (codes.float() - zeros.float()[group]) * scales.float()[group]


def tune(shapes, ms, bits: int = 4, group_size: int = 128, log=print, device=None, timer=None, write=None) -> dict:
    """Time the candidates on the current GPU; returns the table (validated) as a dict, and hands the table so far
    to `write` after each shape (a run cut short keeps the shapes it finished). (device / timer: the CPU and a
    wall clock, to try this under TRITON_INTERPRET=1 without a GPU.)"""
    import torch
    import torch.nn.functional as F

    from .timing import Timer
    from .triton import table as _table
    from .triton.matmul import quant_matmul

    device = torch.device(device or torch.device("cuda", torch.cuda.current_device()))
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    sm = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
    timer = timer or Timer(device)
    ms = sorted(set(ms))
    rows, classes = [], {}
    for k, n in shapes:
        codes, zeros, scales, packed = random_layer(k, n, bits, group_size, device)
        w_t = dequant_ref(codes, zeros, scales, group_size)  # [K, N] fp32
        w16 = w_t.t().contiguous().half()  # [N, K], what nn.Linear holds
        cls = f"{k}x{n}"
        classes[cls] = {"near": [k, n]}
        for i, m in enumerate(ms):
            x = torch.randn(m, k, device=device).half()
            ref = x.float() @ w_t  # [M, N]
            fp16 = timer(lambda: F.linear(x, w16))
            timed, seen = [], set()
            default_entry = _table.default_table().entry(m, n, k, bits, group_size, sm)
            for entry in [default_entry, *candidates(m)]:
                if not _table.can_run(entry["kernel"], m, k, bits, group_size):
                    continue
                cfg = _table.build(entry, m, n, k, bits, group_size, sm)
                if repr(cfg) in seen:  # another entry that means the same launch here
                    continue
                seen.add(repr(cfg))
                try:
                    out = quant_matmul(x, packed, config=cfg)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    if not err < MAX_ERR:
                        log(f"  dropped {entry}: rel. error {err:.1e} at {cls} M={m}")
                        continue
                    timed.append((timer(lambda: quant_matmul(x, packed, config=cfg)), entry))
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported and skipped
                    log(f"  dropped {entry}: {type(exc).__name__}: {str(exc)[:200]}")
            if not timed:
                continue
            default = timed[0] if timed[0][1] is default_entry else None
            timed.sort(key=lambda t: t[0])
            if default is not None and default[0] <= timed[0][0] * (1 + MARGIN):
                timed.remove(default)
                timed.insert(0, default)
            rows.append({"m": [ms[i - 1] + 1 if i else 1, m if i < len(ms) - 1 else None], "class": cls,
                         "try": [e for _, e in timed[:KEEP]],
                         "measured": {"M": m, "fp16_us": round(fp16, 2), "us": [round(t, 2) for t, _ in timed[:KEEP]],
                                      "speedup": round(fp16 / timed[0][0], 3)}})
            log(f"{cls:>11} M={m:<5} fp16 {fp16:8.1f} us  best {fp16 / timed[0][0]:5.2f}x {timed[0][1]}  "
                + " ".join(f"{fp16 / t:.2f}" for t, _ in timed[1:]))
        del codes, zeros, scales, packed, w_t, w16
        torch.cuda.empty_cache()
        if rows and write is not None:
            write(_assemble(name, sm, bits, group_size, classes, rows))
    if not rows:
        from ..errors import LowbitError

        raise LowbitError(f"no candidate kernel ran correctly on {name} (see the lines above)", "report it with that output")
    return _assemble(name, sm, bits, group_size, classes, rows)


def _assemble(name: str, sm: int, bits: int, group_size: int, classes: dict, rows: list) -> dict:
    """The table file's content (validated), rows ordered by M bucket, shapes in the order tuned."""
    import datetime
    import platform

    import torch
    import triton

    from .triton import table as _table

    data = {"schema": _table.SCHEMA, "devices": [name],
            "note": f"written by `lowbit tune-kernels`: W{bits} g{group_size}, fastest candidates first per (M bucket, nearest tuned shape), the default's kept unless {MARGIN:.0%} slower",
            "measured": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": name, "sm_count": sm,
                         "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                         "command": " ".join(["lowbit tune-kernels", *[a for a in sys.argv[1:] if a != "tune-kernels"]]),
                         "timing": "CUDA-graph replays, L2 flushed, median of 40; candidates checked against fp32 first"},
            "in_kernel_reduce_max_m": 8, "classes": dict(classes), "rows": sorted(rows, key=lambda r: r["m"][0])}
    _table.Table(data, f"the table tuned on {name}")  # validates what is about to be written
    return data


def parse_shape(text: str) -> tuple[int, int]:
    from ..errors import LowbitError

    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LowbitError(f"cannot read the layer shape {text!r}", "give KxN (in_features x out_features), e.g. 4096x14336") from None
    return k, n


def main(args) -> Path:
    import torch

    from ..errors import LowbitError
    from .triton import table as _table

    if not torch.cuda.is_available():
        raise LowbitError("tune-kernels times the Triton kernels on a CUDA GPU and found none", "run it on the GPU the model will run on")
    shapes = [parse_shape(t) for t in args.shapes] if args.shapes else DEFAULT_SHAPES
    out = Path(args.out) if args.out else _table.user_path(torch.cuda.get_device_name())
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(data: dict) -> None:  # whole or not at all: a reader never sees half a file
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(out)

    data = tune(shapes, args.ms or DEFAULT_MS, write=write)
    print(f"wrote {out} ({len(data['rows'])} rows); it takes precedence over the shipped tables for {data['devices'][0]}")
    return out


if __name__ == "__main__":  # the same as `lowbit tune-kernels ...` (flags and one-line errors from cli.py)
    from ..cli import main as cli_main

    sys.exit(cli_main(["tune-kernels", *sys.argv[1:]]))
