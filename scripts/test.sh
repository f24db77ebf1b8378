#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite on the CPU. CI runs exactly this.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh --durations=20 -k smollm2`).
set -euo pipefail
cd "$(dirname "$0")/.."
# uv installs without bytecode (compiling all of torch would cost more than it saves): Python writes it on first
# import, so that each test process does not compile torch and transformers again (even where this is set)
unset PYTHONDONTWRITEBYTECODE
# GPTQModel's env for the GPTQ/AWQ interop tests (its own torch) is built beside the project's: they share nothing
peers_log=$(mktemp)
bash scripts/setup-peers.sh >"$peers_log" 2>&1 &
peers=$!
bash scripts/setup.sh --test
if ! wait "$peers"; then
    cat "$peers_log" >&2
    echo "setup-peers.sh failed" >&2
    exit 1
fi
rm -f "$peers_log"
. .venv/bin/activate
export TRITON_INTERPRET=1  # kernels run in Triton's interpreter on the CPU
# two processes, one per core (pytest-xdist; conftest.py gives each its share of threads); each module runs whole in
# one of them, so that a module's fixtures (tiny models, data-parallel runs, SmolLM2 exports) are made once
python -m pytest -q -rs -n 2 --dist loadscope "$@"
