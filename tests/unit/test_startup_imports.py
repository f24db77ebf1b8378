"""What a `lowbit quantize` process imports before its run starts: torch.compile's machinery (dynamo) is
imported only when something compiles. Importing it costs ~2.3 s of every run's start (measured on 2 cores),
RTN's too, and a decorator evaluated at import time (torch.compiler.disable) pulled it in once."""

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
