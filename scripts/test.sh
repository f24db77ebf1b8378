#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite on the CPU. CI runs exactly this.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh --durations=20 -k smollm2`).
set -euo pipefail
cd "$(dirname "$0")/.."
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
python -m pytest -q -rs "$@"
