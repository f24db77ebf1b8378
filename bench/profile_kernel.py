"""What limits a kernel: one launch per case under Nsight Compute (ncu), the table's choice and fp16 cuBLAS.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats python3 bench/profile_kernel.py

Each case is called twice first (Triton compiles, the workspace exists), then once between
cudaProfilerStart / Stop, so ncu sees only that launch (plus the launches the call itself makes).
Cases: KxN:M, default the 70B-sized and 8B-sized layers at the decode sizes the targets name.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lowbit.kernels.triton.matmul import pick_config, quant_matmul
from lowbit.kernels.tune import dequant_ref, random_layer

CASES = ["8192x28672:1", "28672x8192:1", "4096x4096:1", "8192x28672:16", "8192x28672:64"]


def main(cases):
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for case in cases:
        shape, m = case.split(":")
        k, n, m = *map(int, shape.split("x")), int(m)
        codes, zeros, scales, packed = random_layer(k, n, 4, 128, "cuda")
        w16 = dequant_ref(codes, zeros, scales, 128).t().contiguous().half()  # [N, K]
        x = torch.randn(m, k, device="cuda").half()
        print(f"== {case}: {pick_config(m, n, k, 4, 128, sm)}", flush=True)
        for fn in (lambda: quant_matmul(x, packed), lambda: F.linear(x, w16)):
            fn(), fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        del codes, zeros, scales, packed, w16


if __name__ == "__main__":
    main(sys.argv[1:] or CASES)
