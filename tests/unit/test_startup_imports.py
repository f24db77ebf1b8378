"""What importing lowbit's quantize path costs: torch.compile's machinery (dynamo, ~2.3 s to import on 2 cores)
is not imported by lowbit's own modules. transformers' modeling code imports it when the model skeleton is
built (setup), so a run pays it there once; what this keeps fast is everything before: argument and input
errors, `--help`, the `--nproc` launcher. A decorator evaluated at import time (torch.compiler.disable) pulled
it in once."""

from __future__ import annotations

import subprocess
import sys


def test_the_quantize_path_does_not_import_dynamo():
    code = (
        "import sys\n"
        "import lowbit.runner, lowbit.cli, lowbit.blockstep, lowbit.algorithms.autoround, lowbit.algorithms.gptq, lowbit.algorithms.awq\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo') or m.startswith('torch._inductor')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"imported at start: {out[:300]}"
