#!/usr/bin/env bash
# AWQ and GPTQ beside llm-compressor's on one GPU (ANCHORS protocol, SmolLM2-135M), W4 and W3 at group 64
# (llm-compressor needs the group to divide every layer's inputs: 64 divides SmolLM2's 576 and 1536, 128
# does not), the same 64 x 512 token windows of "austen" for every method. Each (method, bits) is its own
# process, JOBS at a time on the one GPU; the llm-compressor runs add LLMC_SITE (llmcompressor 0.14,
# compressed-tensors 0.19, auto-round 0.15.1) to PYTHONPATH. Prints the table last.
#
#   RESULTS_DIR=/tmp/res LLMC_SITE=/tmp/site-llmc JOBS=10 bash bench/accuracy_awq_gptq_gpu.sh
set -uo pipefail
RESULTS_DIR=${RESULTS_DIR:-bench/results}
JOBS=${JOBS:-10}
LLMC_SITE=${LLMC_SITE:-}
PY=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
$PY -c "from lowbit.model import resolve_model; print(resolve_model('default'))" || exit 1
{
  for bits in 4 3; do
    for m in rtn awq gptq llmc-awq llmc-gptq; do echo "$m $bits"; done
  done
} | xargs -P "$JOBS" -L 1 sh -c '
  site=""; case "$0" in llmc-*) site="'"$LLMC_SITE"':";; esac
  PYTHONPATH="$site$PYTHONPATH" OMP_NUM_THREADS=2 '"$PY $here"'/accuracy_awq_gptq.py --methods "$0" --bits "$1" --group 64 \
    --nsamples 64 --seqlen 512 --device cuda --results '"$RESULTS_DIR"' > '"$RESULTS_DIR"'/log-$0-w$1.txt 2>&1 || echo "FAILED: $0 $1"'
$PY - "$RESULTS_DIR" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("accuracy-awq-gptq-*.json")):
    r = json.loads(p.read_text())
    print(f"{p.name:55s} {r['ppl']['austen-eval']:9.3f} {r['ppl']['kjv']:9.3f} {r['quantize_seconds']:7.0f}s")
PY
