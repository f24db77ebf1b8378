"""Offline sm_90 compiles of lowbit's Triton kernels, no GPU needed: Triton's own shared-memory figure
(`CompiledKernel.metadata.shared`) for a launch, specialized as the JIT specializes it (pointers 16-byte aligned,
ints divisible by 16 marked so, ints equal to 1 made constants), for checking smem.py's estimate against the
real compiler. Runs in a process of its own (TRITON_INTERPRET unset: the interpreter's kernels cannot compile).

    python tests/unit/kernels/sm90_compile.py '[{"kernel": "lowbit.kernels.triton.moe:_moe_kernel", "ptrs": {...},
        "ints": {...}, "constexprs": {...}, "num_warps": 4, "num_stages": 3}, ...]'   -> one JSON list of bytes
"""

from __future__ import annotations

import importlib
import json
import sys


def shared_bytes(kernel: str, ptrs: dict, ints: dict, constexprs: dict, num_warps: int, num_stages: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, arg in enumerate(fn.arg_names):
        if arg in ptrs:
            signature[arg], attrs[(i,)] = "*" + ptrs[arg], [["tt.divisibility", 16]]
        elif arg in ints and ints[arg] == 1:
            signature[arg], consts[arg] = "constexpr", 1
        elif arg in ints:
            signature[arg] = "i32"
            if ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


if __name__ == "__main__":
    print(json.dumps([shared_bytes(**case) for case in json.loads(sys.argv[1])]))
