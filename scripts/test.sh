#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite on the CPU. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/setup-peers.sh  # GPTQModel for the GPTQ/AWQ interop tests (its own torch)
. .venv/bin/activate
export TRITON_INTERPRET=1  # kernels run in Triton's interpreter on the CPU
python -m pytest -q -rs "$@"
