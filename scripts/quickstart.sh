#!/usr/bin/env bash
# The main job on the default model: set up, quantize SmolLM2-135M-Instruct to W4A16 group 128 (asym),
# print fp vs quantized perplexity (ANCHORS protocol), and generate an answer with the quantized model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/smollm2-w4a16-g128}
METHOD=${METHOD:-rtn}
lowbit quantize default --method "$METHOD" --scheme W4A16 --group_size 128 --asym --format auto_round --output_dir "$OUT" --overwrite
lowbit eval default --ppl | tee /tmp/lowbit-fp.txt
lowbit eval "$OUT" --ppl | tee /tmp/lowbit-q.txt
lowbit generate "$OUT" --prompt "What is the capital of France? Answer in one sentence." --max_new_tokens 32
echo "fp:        $(cat /tmp/lowbit-fp.txt)"
echo "quantized: $(cat /tmp/lowbit-q.txt)"
