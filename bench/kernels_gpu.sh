#!/usr/bin/env bash
# One device call: GPU kernel tests, the small-M split tuning on decode shapes, the --quick kernel table.
# Everything lands in $OUT/kernels-gpu.tar.gz (logs + JSON), the table is printed last.
#   bash bench/kernels_gpu.sh            (on the lent GPU machine, from the repository root)
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/k"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/k/gpu.txt"
timeout "${TEST_S:-120}" python3 -m pytest -q tests/unit/kernels/test_triton_kernels.py -p no:cacheprovider \
    -k "${TEST_K:-unpack4 or quant_matmul_small or paths or (gpu_large and (False-4] or True-4] or False-16] or True-16] or False-64] or True-64]))}" > "$OUT/k/gpu-tests.log" 2>&1
tail -3 "$OUT/k/gpu-tests.log"
[ "${TUNE_S:-150}" = 0 ] || timeout "${TUNE_S:-150}" python3 bench/decode_tune.py --chain 16 --ms ${TUNE_MS:-4 8 16} --only-unpack4 > "$OUT/k/tune.log" 2>&1
grep -E "^[0-9]+x[0-9]+ M=|CHECK FAILED" "$OUT/k/tune.log" | cut -c1-160
timeout "${QUICK_S:-240}" python3 bench/kernel_speed.py --quick ${QUICK_ARGS:-} > "$OUT/k/quick.log" 2>&1
cp bench/results/decode-tune-"$(date +%F)".json bench/results/kernels-"$(date +%F)"-r2.json "$OUT/k/" 2>/dev/null
tar czf "$OUT/kernels-gpu.tar.gz" -C "$OUT" k && rm -rf "$OUT/k/"*.json
tail -20 "$OUT/k/quick.log"
