"""tables/h100.json against the code it replaced: the old `pick_config` (main at f209dca, read from git) and the
default table must answer alike for every case below, except the one deliberate change (W2 with groups smaller than
the 256-deep chunk at M = 2-16: dequantize + cuBLAS instead of a launch over the shared-memory limit).

    PYTHONPATH=src python bench/check_h100_table.py        (CPU; Triton installed; prints the counts)
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.kernels.triton import table
from lowbit.kernels.triton.matmul import pick_config

OLD = "f209dca"
MS = list(range(1, 300)) + [383, 384, 511, 512, 513, 768, 1000, 1023, 1024, 1025, 2048, 4096, 8192]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192), (4096, 6144), (4096, 28672),
          (4096, 1024), (2048, 5632), (5632, 2048), (576, 1536), (1536, 576), (4160, 4096), (8192, 16640), (8192, 16896), (8192, 12672),
          (8192, 12544), (3072, 8192), (8192, 3072), (160, 40), (224, 24), (96, 72), (4096, 4160), (8192, 4096), (1024, 33000)]  # (K, N)
SCHEMES = [(4, 128), (4, 64), (4, 32), (8, 128), (2, 64), (4, 256), (4, -1), (8, -1), (2, 32)]  # (bits, group size)


def old_module():
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{OLD}:src/lowbit/kernels/triton/matmul.py"], cwd=root, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_matmul.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("lowbit.kernels.triton.old_matmul", path)  # its relative imports resolve in lowbit
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    old, default = old_module(), table.default_table()
    same = changed = other = 0
    for (k, n), m, (bits, gs), sm in itertools.product(SHAPES, MS, SCHEMES, (132, 114, 78)):
        g = k if gs == -1 else gs
        a, b = repr(old.pick_config(m, n, k, bits, g, sm)), repr(pick_config(m, n, k, bits, g, sm, default))
        if a == b:
            same += 1
        elif bits == 2 and 2 <= m <= 16 and g < k and g % 256:
            changed += 1
        else:
            other += 1
            print("DIFFERS", (m, n, k, bits, g, sm), a, b)
    print(f"same {same}, the deliberate W2 change {changed}, other differences {other}")
    sys.exit(1 if other else 0)


if __name__ == "__main__":
    main()
