#!/usr/bin/env bash
# One device call for the block engine and the reliability matrix: the path matrix (every method x format,
# cpu and cuda, against an independent dequantization) and the VLM scale check (gemma-4-31B-it and
# Qwen3-VL-32B shapes, BLOCKS blocks each, RTN and AutoRound through the CLI). Needs .cache/austen.txt
# (carry it: `python -c "from lowbit.calib.corpora import load_text; open('.cache/austen.txt','w').write(load_text('austen'))"`).
#   bash bench/engine_gpu.sh        (on the lent GPU machine, from the repository root)
set -u
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
df -h /tmp | tail -1
if [ "${MATRIX_S:=150}" != 0 ]; then
  timeout "$MATRIX_S" python3 bench/path_matrix.py --device cpu cuda > "$OUT/path-matrix.log" 2>&1
  echo "path matrix: exit $?"; cp bench/results/path-matrix-*.json "$OUT/" 2>/dev/null
fi
if [ "${SCALE_S:=420}" != 0 ]; then
  timeout "$SCALE_S" python3 bench/vlm_scale.py --text .cache/austen.txt --blocks "${BLOCKS:-8}" --models "${MODELS:-gemma4,qwen3vl}" --workdir /tmp/vlm-scale --out "$OUT" > "$OUT/vlm-scale.log" 2>&1
  echo "vlm scale: exit $?"
  grep -E "wrote|error|Error|block [0-9]+: loss" "$OUT/vlm-scale.log" | cut -c1-160 | tail -30
fi
tail -32 "$OUT/path-matrix.log" | cut -c1-160
tail -6 "$OUT/vlm-scale.log"
